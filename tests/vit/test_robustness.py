"""The ``vit`` modules' and ``python -m vit``'s robustness: bad input is one line, an empty batch runs.

1. Errors at the public boundary of ``vit`` (``PatchEmbedding``, ``MultiHeadAttention``, ``ViT``)
   and of ``python -m vit`` (a missing or unreadable file, ``--batch 0``, a directory, any OSError
   reading the image): one line naming what was expected and what came, and for the main job a
   failing exit status and no traceback. More of the main job's refusals are in test_main.py.
2. An empty batch through the fused model launches nothing.
3. Honest dispatch: a fused model on the CPU under "auto" says once per op that it falls back.

The same checks for attention and the patch projection are in tests/attention/ and
tests/patch_embed/ (test_robustness.py); the shared helpers in tests/robustness.py.
"""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from tests.equivalence import DEVICE
from tests.robustness import one_line_error, randn
from vit.model import MultiHeadAttention, PatchEmbedding, ViT

vit_main = importlib.import_module("vit.__main__")

ROOT = Path(__file__).resolve().parents[2]
SMALL_VIT = {"image_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 10}


# ---------------------------------------------------------------------------------------------
# 1. Errors at the public boundary.


@pytest.mark.parametrize("fused", [pytest.param(True, marks=pytest.mark.interpreter), False])
def test_vit_modules_bad_input_is_a_one_line_error(fused):
    torch.manual_seed(0)
    embedding = PatchEmbedding(32, 16, 3, 24, fused=fused).to(DEVICE)
    attention = MultiHeadAttention(32, 2, fused=fused).to(DEVICE)
    model = ViT(fused=fused, **SMALL_VIT).to(DEVICE)
    with kernels.use_backend("triton"):
        one_line_error(TypeError, "^PatchEmbedding: expected images to be a tensor, got list", embedding, [[0.0]])
        for shape in ((3, 32, 32), (1, 4, 32, 32)):
            one_line_error(ValueError, rf"^PatchEmbedding: expected images \(B, 3, H, W\), got {re_shape(shape)}",
                           embedding, randn(*shape))
        one_line_error(TypeError, r"^PatchEmbedding: expected floating-point images \(uint8 ones: .float\(\) / 255\), "
                       "got torch.uint8", embedding, torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device=DEVICE))
        one_line_error(ValueError, "^PatchEmbedding: image sides must be multiples of the patch size 16, got 40x32",
                       embedding, randn(1, 3, 40, 32))
        one_line_error(TypeError, "^MultiHeadAttention: expected tokens to be a tensor, got list", attention, [[0.0]])
        for shape in ((5, 32), (1, 5, 16), (1, 1, 5, 32)):
            one_line_error(ValueError, rf"^MultiHeadAttention: expected tokens \(B, N, 32\), got {re_shape(shape)}",
                           attention, randn(*shape))
        one_line_error(ValueError, r"^PatchEmbedding: expected images \(B, 3, H, W\), got \(1, 1, 32, 32\)",
                       model, randn(1, 1, 32, 32))
        one_line_error(ValueError, r"^attention: expected a mask broadcastable to \(B, H, Nq, Nk\) = \(1, 2, 5, 5\), "
                       r"got \(4, 4\)", model, randn(1, 3, 32, 32), torch.ones(4, 4, dtype=torch.bool, device=DEVICE))


def re_shape(shape) -> str:
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


def run_vit_cli(*arguments: str, cwd: Path = ROOT) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "vit", *arguments], cwd=cwd, env=environment,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_bad_input_is_one_line_on_stderr_and_a_failing_exit(tmp_path):
    """`python -m vit` on a missing file, an unreadable file and `--batch 0`: a non-zero exit and
    one line on stderr naming the problem, never a traceback. The processes run side by side (each
    spends its seconds importing torch); the other kinds of bad file are tested in-process below."""
    unreadable = tmp_path / "locked.png"
    unreadable.write_text("not for your eyes\n")
    unreadable.chmod(0)  # root reads it anyway: then it is a file Pillow cannot read, the same kind of error
    cases = {
        "missing": (["missing.png"], r"^python -m vit: no image file at missing.png$"),
        "unreadable": (
            [str(unreadable)],
            rf"^python -m vit: (no permission to read the image file|not an image Pillow can read:) {re.escape(str(unreadable))}$",
        ),
        "batch 0": (["--batch", "0"], r"^python -m vit: --batch must be at least 1, got 0$"),
    }
    processes = {name: run_vit_cli(*arguments) for name, (arguments, _) in cases.items()}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode != 0, name
        assert "Traceback" not in stderr, f"{name}: {stderr}"
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, f"{name}: {stderr}"
        assert re.search(cases[name][1], lines[0]), f"{name}: {lines[0]}"


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run ``python -m vit``'s main in this process: (exit code, stderr)."""

    def run(*arguments: str):
        code = vit_main.main([*arguments, "--backend", "einsum"])
        return code, capsys.readouterr().err

    return run


def test_cli_directory_or_text_file_is_one_line(cli, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("meow\n")
    for path, message in ((tmp_path, "expected an image file, got a directory"), (text, "not an image Pillow can read")):
        code, stderr = cli(str(path))
        assert code == 2 and stderr == f"python -m vit: {message}: {path}\n"


@pytest.mark.parametrize(
    "error",
    [PermissionError(13, "Permission denied"), OSError("image file is truncated")],
    ids=["permission", "os-error"],
)
def test_cli_any_os_error_reading_the_image_is_one_line(monkeypatch, cli, error):
    """Before, only FileNotFoundError and ValueError were caught: a directory or a file without
    read permission ended in a traceback."""

    def load_image(path, size):
        raise error

    monkeypatch.setattr(vit_main, "load_image", load_image)
    code, stderr = cli("cats.png")
    assert code == 2 and stderr.count("\n") == 1 and stderr.startswith("python -m vit: "), stderr


# ---------------------------------------------------------------------------------------------
# 2. An empty batch.


def test_vit_on_an_empty_batch(no_launches):
    model = ViT(fused=True, **SMALL_VIT).to(DEVICE)
    with kernels.use_backend("triton"):
        logits = model(randn(0, 3, 32, 32))
    assert logits.shape == (0, 10)


# ---------------------------------------------------------------------------------------------
# 3. Honest dispatch: a fallback is never silent.


def test_fused_vit_on_cpu_under_auto_is_not_silent(fresh_warnings):
    """A model built with fused=True whose tensors force the reference says so (once per op)."""
    model = ViT(fused=True, **SMALL_VIT)
    with kernels.use_backend("auto"), pytest.warns(UserWarning) as record:
        model(torch.rand(1, 3, 32, 32))
    messages = sorted(str(w.message) for w in record if "vitriton" in str(w.message))
    assert len(messages) == 2 and "attention got tensors on cpu" in messages[0] and "patch_embed" in messages[1]
