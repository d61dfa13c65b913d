"""``python -m vit``: bad input ends in one line on stderr and exit status 2, never a traceback.

The first cases (a missing or unreadable file, ``--batch 0``) are in test_robustness.py beside
this file; these are the ones that ended in tracebacks before: a batch too big for the memory there
is, an image above Pillow's decompression-bomb limit, a VITRITON_BACKEND that names no backend.
And the main job runs under ``kernels.use_backend``, so it leaves no global backend behind.
"""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import kernels
from vit.model import ViT

vit_main = importlib.import_module("vit.__main__")
ROOT = Path(__file__).resolve().parents[2]
TINY = "vit_tiny_patch16_224"  # the fastest preset to run for real


def run_main(capsys, *arguments: str) -> tuple[int, str]:
    """main() in this process: (exit status, stderr)."""
    code = vit_main.main([*arguments, "--backend", "einsum"])
    return code, capsys.readouterr().err


@pytest.mark.subprocess  # the fast subset's one real `python -m vit` (about 3 s)
def test_a_batch_no_memory_can_hold_is_one_line_before_any_work():
    # Before: a RuntimeError traceback from PyTorch's allocator (or, where the memory is
    # overcommitted, the kernel's OOM killer) once the batch was cut into patches.
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "vit", "--model", TINY, "--batch", "100000000"],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.fullmatch(
        rf"python -m vit: --batch 100000000 needs at least [\d.]+ GiB for {TINY} on (cpu|cuda), "
        r"but [\d.]+ GiB is free: use a smaller --batch\n",
        result.stderr,
    ), result.stderr[-3000:]


def test_batch_10000_beyond_free_memory_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(vit_main, "free_memory", lambda device: 4 * 2**30)
    code, stderr = run_main(capsys, "--batch", "10000")
    assert code == 2
    match = re.fullmatch(
        r"python -m vit: --batch 10000 needs at least ([\d.]+) GiB for vit_base_patch16_224 on (cpu|cuda), "
        r"but 4.0 GiB is free: use a smaller --batch\n",
        stderr,
    )
    assert match, stderr
    assert 50 < float(match[1]) < 100, stderr  # 7.9 MB an image
    device = match[2]
    assert vit_main.memory_problem("vit_base_patch16_224", 400, device) is None
    assert vit_main.memory_problem("vit_base_patch16_224", 600, device) is not None


def test_the_memory_estimate_is_below_the_measured_peak():
    """The check only refuses batches that cannot run: the estimate stays below the peak memory
    per image measured on the CPU with the einsum fallback (ru_maxrss of whole runs at batch
    8 and 40, the difference over 32; the lowest of a few runs and kernel versions)."""
    measured = {"vit_tiny_patch16_224": 10.7e6, "vit_base_patch16_224": 12.3e6, "vit_tiny_patch16_384": 15.3e6}
    for name, peak in measured.items():
        estimate = vit_main.bytes_per_image(vit_main.PRESETS[name])
        assert peak / 5 <= estimate <= peak / 1.5, (name, estimate, peak)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 6021120000 bytes. "
                     "Error code 12 (Cannot allocate memory)"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 18.00 GiB.\nSee the documentation"),
        MemoryError(),
    ],
    ids=["cpu allocator", "cuda", "python"],
)
def test_running_out_of_memory_midway_is_one_line(monkeypatch, capsys, error):
    """The estimate can be wrong, and other programs take memory too: an allocation failure
    during the run also ends in one line."""

    def forward_features(self, images, mask=None):
        raise error

    monkeypatch.setattr(ViT, "forward_features", forward_features)
    code, stderr = run_main(capsys, "--model", TINY, "--batch", "3")
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert code == 2
    assert stderr == f"python -m vit: --batch 3 ran out of memory on {device} ({first_line}); try a smaller --batch\n"


def test_other_runtime_errors_keep_their_traceback(monkeypatch, capsys):
    def forward_features(self, images, mask=None):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(ViT, "forward_features", forward_features)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run_main(capsys, "--model", TINY)


@pytest.mark.parametrize("batch", ["0", "-3"])
def test_batch_below_one_is_one_line(capsys, batch):
    code, stderr = run_main(capsys, "--batch", batch)
    assert code == 2 and stderr == f"python -m vit: --batch must be at least 1, got {batch}\n"


@pytest.mark.parametrize("limit", [100_000, 200_000], ids=["Pillow raises", "Pillow warns"])
def test_image_above_the_decompression_bomb_limit_is_one_line(monkeypatch, capsys, tmp_path, limit):
    # 500 x 500 = 250000 pixels: above twice 100000 Pillow raises DecompressionBombError (before:
    # a traceback), above 200000 it warns and decodes. The model's 224 x 224 input is below both.
    path = tmp_path / "big.png"
    Image.new("RGB", (500, 500), (200, 100, 50)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    code, stderr = run_main(capsys, str(path), "--model", TINY)
    assert code == 2
    assert stderr == (
        f"python -m vit: expected an image of at most PIL.Image.MAX_IMAGE_PIXELS = {limit} pixels, Pillow's "
        f"guard against decompression bombs (raise it for a file you trust), got more: {path}\n"
    )


def test_runs_under_use_backend_and_leaves_the_threads_backend_alone(monkeypatch, capsys):
    # Before, main() called the global kernels.set_backend, which is no longer public.
    seen = []
    run = vit_main.run

    def recording_run(*args):
        seen.append(kernels.get_backend())
        return run(*args)

    monkeypatch.setattr(vit_main, "run", recording_run)
    before = kernels.get_backend()
    code, stderr = run_main(capsys, "--model", TINY, "--batch", "2")
    assert code == 0 and stderr == ""
    assert seen == ["einsum"] and kernels.get_backend() == before


def test_several_images_at_native_resolution_run_packed(tmp_path, capsys):
    wide, tall = tmp_path / "wide.png", tmp_path / "tall.png"
    Image.new("RGB", (100, 60), (200, 10, 10)).save(wide)  # rounds to 64 x 96: 4 x 6 patches of 16
    Image.new("RGB", (40, 90), (10, 200, 10)).save(tall)  # rounds to 96 x 48: 6 x 3 patches
    code = vit_main.main([str(wide), str(tall), "--native", "--model", "vit_tiny_patch16_224", "--backend", "einsum"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"{wide}: (64, 96) -> 25 tokens, rows 0:25" in out
    assert f"{tall}: (96, 48) -> 19 tokens, rows 25:44" in out
    assert "cu_seqlens = [0, 25, 44]: one attention_varlen call per layer (12)" in out
    assert "logits: (2, 1000)" in out


def test_packing_with_a_batch_is_one_line(capsys):
    code = vit_main.main(["--native", "--batch", "2", "--backend", "einsum"])
    assert code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_an_empty_image_name_is_one_line(capsys):
    """Before: "expected an image file, got a directory: ." (Path("") is the current directory)."""
    for arguments in ([""], ["", "--native"]):
        code, stderr = run_main(capsys, *arguments, "--model", TINY)
        assert code == 2 and stderr == "python -m vit: expected an image file, got an empty file name\n"


def test_without_backend_the_calling_threads_backend_runs(monkeypatch, capsys):
    seen = []
    run = vit_main.run

    def recording_run(*args):
        seen.append(kernels.get_backend())
        return run(*args)

    monkeypatch.setattr(vit_main, "run", recording_run)
    with kernels.use_backend("einsum"):
        assert vit_main.main(["--model", TINY]) == 0
    assert seen == ["einsum"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_vitriton_backend_is_read_any_case_and_a_bad_one_is_one_line():
    """Before, --backend's default "auto" hid VITRITON_BACKEND from the main job: "bogus" ran as
    if unset. Now a bad value is one line and exit status 2, and the others run as their name
    says (any case; empty means unset). The processes run side by side."""
    cases = {"bogus": 2, "EINSUM": 0, "": 0}
    if not torch.cuda.is_available():
        cases["Triton"] = 2  # the fused kernels need a GPU: said in one line
    processes = {
        value: subprocess.Popen(
            [sys.executable, "-m", "vit", "--model", TINY],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "VITRITON_BACKEND": value},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for value in cases
    }
    expected_stderr = {
        "bogus": ("python -m vit: VITRITON_BACKEND: expected one of ('auto', 'triton', 'einsum') (any case; empty "
                  "means unset), got 'bogus'\n"),
        "EINSUM": "",
        "": "",
        "Triton": "python -m vit: VITRITON_BACKEND=triton needs a CUDA GPU, and none is present\n",
    }
    for value, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == cases[value], f"{value!r}: {stderr[-3000:]}"
        assert stderr == expected_stderr[value], f"{value!r}: {stderr[-3000:]}"
        if cases[value] == 0:
            assert "6. classification head: (1, 1000)" in stdout, f"{value!r}: {stdout[-3000:]}"
