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
