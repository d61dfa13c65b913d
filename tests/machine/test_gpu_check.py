"""``python -m bench.gpu_check``, which needs a GPU to do anything: without one it says so in one line,
and its table's ratios are to the fastest peer."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.subprocess
def test_gpu_check_without_a_gpu_says_so_in_one_line():
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "bench.gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing checked or timed"
    ]


def test_gpu_check_table_ratios_are_to_the_fastest_peer():
    from bench import gpu_check

    timings = [
        {"case": "c", "provider": "vitriton", "role": "ours", "ms": 1.0, "inputs": "views",
         "tflops": 300.0, "roofline_fraction": 0.5, "bound": "compute"},
        {"case": "c", "provider": "slow", "role": "peer", "ms": 4.0, "inputs": "views"},
        {"case": "c", "provider": "fast", "role": "peer", "ms": 2.0, "inputs": "contiguous copies"},
        {"case": "c", "provider": "broken", "role": "peer", "error": "RuntimeError: no"},
        {"case": "d", "provider": "vitriton", "role": "ours", "ms": 1.0, "inputs": "views"},
    ]
    table = gpu_check.markdown(["header"], [{"shape": "s", "B, H, N, D": "1, 2, 3, 4", "result": "pass"}], timings)
    assert "| c | vitriton | 1.000 | 300.0 | 2.00x | 50% (compute) | views |" in table
    assert "| c | slow | 4.000 |  | 0.50x |  | views |" in table
    assert "| c | broken | | | | | RuntimeError: no |" in table
    assert "| d | vitriton | 1.000 |  | no peer ran |  | views |" in table
    assert "| s | 1, 2, 3, 4 | pass |" in table


@pytest.mark.interpreter
def test_gpu_check_fp8_verdict_passes_the_kernel_and_fails_a_wrong_output(monkeypatch):
    """Phase 5's check at a tiny shape (through the interpreter on a CPU): the FP8 kernel's output
    is within the bound; the same check fails an output 10% too large."""
    import kernels
    from bench import gpu_check, sass
    from tests.equivalence import DEVICE

    monkeypatch.setattr(gpu_check, "DEVICE", DEVICE)  # the interpreter's CPU, or the GPU
    monkeypatch.setitem(sass.SHAPES, "tiny", sass.Shape(batch=2, heads=2, tokens=37, head_dim=32, image=0, patch=1))
    _, quantised = gpu_check._fp8_inputs("tiny", 2)
    with kernels.use_backend("triton"):
        assert gpu_check._fp8_result(quantised).startswith("pass (max error")
        attention = kernels.attention
        monkeypatch.setattr(kernels, "attention", lambda *args, **kwargs: attention(*args, **kwargs) * 1.1)
        assert gpu_check._fp8_result(quantised).startswith("FAIL")


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore::pytest.PytestUnknownMarkWarning")  # bench's marks, registered by bench/conftest.py
def test_gpu_check_phases_run_end_to_end_at_tiny_shapes(monkeypatch):
    """Every phase of gpu_check that runs on one GPU, run here at tiny shapes (the interpreter on a
    CPU: the timing a single call, the GPU's capability faked as sm_90 and then sm_100), so that the
    first GPU lease is not spent on a bug in code that only a GPU runs: each correctness row passes,
    each of our timing rows has a time, each peer has a time or its error, and the report renders."""
    import torch

    from bench import gpu_check, sass
    from tests.equivalence import DEVICE

    tiny = {name: sass.Shape(batch=1, heads=2, tokens=37, head_dim=shape.head_dim, image=32, patch=16)
            for name, shape in sass.SHAPES.items()}
    for name, shape in tiny.items():
        monkeypatch.setitem(sass.SHAPES, name, shape)
    monkeypatch.setattr(gpu_check, "DEVICE", DEVICE)
    monkeypatch.setattr(gpu_check, "_timed", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(gpu_check, "TIMED", [("vit_b16", 1)])
    monkeypatch.setattr(gpu_check, "FP8_TIMED", [("vit_b16", 1), ("siglip_so400m", 1)])
    monkeypatch.setattr(gpu_check, "BLACKWELL_TIMED", [("vit_h14", 1)])
    monkeypatch.setattr(gpu_check, "SWITCH_OVER_LENGTHS", (40,))
    monkeypatch.setattr(gpu_check, "SWITCH_OVER_TOKENS", 40)
    monkeypatch.setattr(gpu_check, "PATCH_EMBED", {"image": 32, "patch": 16, "dim": 64, "batch": 1})
    providers = gpu_check._attention_providers
    monkeypatch.setattr(gpu_check, "_attention_providers",  # compiled FlexAttention: minutes on a CPU
                        lambda: {k: v for k, v in providers().items() if k != "flex-compiled"})
    clock = gpu_check.Clock(1e9)
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: capability[0])
    correctness = gpu_check.check_correctness(clock)
    timings = gpu_check.time_attention(clock, None) + gpu_check.time_switch_over(clock, None)
    fp8_rows, fp8_timings = gpu_check.check_and_time_fp8(clock, None)
    timings += fp8_timings + gpu_check.time_patch_embed(clock, None)
    from bench import test_varlen  # the packed-images phase: its GPU mixes, made tiny

    for name, window, backward in (("vlm-native", 0, True), ("vlm-windows", 2, False)):
        mix = test_varlen.Mix(name, ((56, 42), (28, 28)), 14, 2, 80, torch.bfloat16, backward, window)
        monkeypatch.setitem(test_varlen.MIXES, f"{name}-bf16-{'fwdbwd' if backward else 'fwd'}", mix)
    monkeypatch.delitem(test_varlen.PROVIDERS, "flex-document")  # compiled: minutes on a CPU
    import kernels

    with kernels.use_backend("triton"):  # bench's "ours" names no backend: on a CPU, auto would run einsum
        varlen_rows, varlen_timings = gpu_check.time_varlen(clock, None)
    correctness += varlen_rows
    timings += varlen_timings
    not_blackwell, none = gpu_check.check_blackwell(clock, None)
    assert none == [] and not_blackwell[0]["result"].startswith("not run: needs an sm_100 GPU")
    capability[0] = (10, 0)
    blackwell_rows, blackwell_timings = gpu_check.check_blackwell(clock, None)
    correctness += fp8_rows + blackwell_rows
    timings += blackwell_timings
    assert len(correctness) == 4 + 2 + 1 + 4
    failed = [row for row in correctness if not row["result"].startswith("pass")]
    assert not failed, failed
    ours = [row for row in timings if row["role"] == "ours"]
    assert ours and all("ms" in row for row in ours), [row for row in ours if "ms" not in row]
    assert all("ms" in row or "error" in row for row in timings)
    assert {row["provider"] for row in timings} >= {
        "vitriton", "vitriton-fused", "vitriton-pair", "vitriton-fp8", "vitriton-fp8 + quantize_fp8", "vitriton-bf16",
        "vitriton-bf16 not warp-specialised", "conv2d", "sdpa-per-image", "sdpa-block-diagonal",
    }
    report = gpu_check.markdown(["header"], correctness, timings)
    assert "FP8 forward" in report and "fwd (FP8 phase)" in report and "fwd (Blackwell phase)" in report
