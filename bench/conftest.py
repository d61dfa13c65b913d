"""Session-wide pieces of the benchmarks: the machine's limits, measured once, and the run's record.

    pytest --benchmark-only                                  # from the repository root
    pytest --benchmark-only --benchmark-json=out.json && python3 bench/results_table.py out.json

The record (versions, device, the CPU's model and bfloat16 units, measured limits, command line,
every skipped provider with its reason) goes into the JSON's ``machine_info["vitriton"]`` through
pytest-benchmark's ``pytest_benchmark_update_machine_info`` hook, so ``bench/results_table.py``
needs nothing else. The run's header names the CPU kind (``pytest_report_header``).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import platform

import pytest
import torch

from bench.harness import DEVICE, ON_GPU, cpu_kind, cpu_line
from bench.roofline import MachineLimits, measure_limits

RECORD: dict = {"skipped": []}  # filled during the session, written into machine_info at its end


@pytest.fixture(scope="session")
def machine_limits(request) -> MachineLimits | None:
    """The compute and bandwidth ceilings of this device, measured once; None when nothing is timed."""
    if request.config.getoption("benchmark_disable"):
        return None
    limits = measure_limits(DEVICE)
    RECORD["limits"] = dataclasses.asdict(limits)
    return limits


LEFTOVER_BYTES = 64 << 20  # more than cuBLAS/cuDNN workspaces: tensors an earlier case left behind


@pytest.fixture(autouse=True)
def _fresh_start():
    """Each case starts seeded, with Dynamo's caches and the GPU memory of earlier cases freed.

    Dynamo keeps compiled code per Python code object, with what it compiled alive, and after a
    few shapes stops recompiling (running eager, silently slow); the cases compile the same
    functions and module classes at many shapes, so each starts from an empty cache. Tensors are
    freed when a case's locals go; only reference cycles (a compiled model, an exception's
    frames) outlive it, and they would count in the next case's peak memory. ``gc.collect()``
    costs about 0.1-0.3 s, too much before each of a thousand cases, so it runs only when
    memory is still held.
    """
    torch.manual_seed(0)
    torch._dynamo.reset()
    if ON_GPU and torch.cuda.memory_allocated() > LEFTOVER_BYTES:
        gc.collect()
        torch.cuda.empty_cache()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def pytest_report_header(config) -> str:
    """One header line naming the CPU kind: the CPU benchmarks' ratios depend on it."""
    return f"cpu: {cpu_line()}, {torch.get_num_threads()} torch threads"


def pytest_benchmark_update_machine_info(config, machine_info):
    import kernels

    machine_info["vitriton"] = {
        "device": torch.cuda.get_device_name() if ON_GPU else f"cpu ({platform.processor() or platform.machine()})",
        "cpu": cpu_kind(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if ON_GPU else None,
        "timm": _version("timm"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "xformers": _version("xformers"),
        "kernels_backend": kernels.get_backend(),
        "command": " ".join(["pytest", *config.invocation_params.args]),
        **RECORD,
    }


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each skipped benchmark's group, provider and reason: the JSON lists only what ran."""
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("benchmark")
    if report.skipped and marker is not None and "group" in marker.kwargs:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        params = getattr(getattr(item, "callspec", None), "params", {})
        RECORD["skipped"].append(
            {"group": marker.kwargs["group"], "provider": params.get("provider"), "reason": reason.removeprefix("Skipped: ")}
        )
