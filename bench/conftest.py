"""Session-wide pieces of the benchmarks: what runs, the machine's limits, the run's record and its table.

    pytest --benchmark-only                                  # from the repository root: bench/ only
    pytest --benchmark-only --bench-sweep                    # every shape, batch, dtype and pass
    pytest --benchmark-only --benchmark-json=out.json && python3 bench/results_table.py out.json

By default each file times a few representative sizes (on a GPU the sizes the targets name; on a
2-core CPU the whole run takes a few minutes); ``--bench-sweep`` (registered in the root
conftest.py) times every case, marked ``sweep`` here (``harness.case_params``). On a machine
without a CUDA GPU the providers that cannot run there (marked ``cuda_only``: our Triton kernels,
CUDA-only peers, compiled runs) are left out before running, and the run says so in one line per
reason, not in one skip per case. The end of the run prints one narrow table per group (provider,
median, TFLOP/s, ratio to the fastest peer, and why a provider was skipped) instead of
pytest-benchmark's wide ones (``--benchmark-verbose`` brings those back).

The record (versions, device, the CPU's model and bfloat16 units, measured limits, command line,
every skipped or left-out provider with its reason) goes into the JSON's
``machine_info["vitriton"]`` through pytest-benchmark's ``pytest_benchmark_update_machine_info``
hook, so ``bench/results_table.py`` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import os
import platform
import textwrap

import pytest
import torch

from bench.harness import DEVICE, ON_GPU, TRITON_NEEDS_GPU, cpu_kind, cpu_line
from bench.results_table import ROLE_ORDER, number, seconds
from bench.roofline import MachineLimits, measure_limits


@dataclasses.dataclass
class Run:
    """What the session learns as it goes, for the JSON record and the closing table."""

    limits: dict | None = None  # the measured MachineLimits, when anything is timed
    timed: dict[str, list[dict]] = dataclasses.field(default_factory=dict)  # group -> [{provider, role, median_s, tflops}]
    skipped: list[dict] = dataclasses.field(default_factory=list)  # {group, provider, reason}: skipped while running
    not_run: list[dict] = dataclasses.field(default_factory=list)  # the same, left out before running (no GPU)
    sweep_only: int = 0  # cases left out because --bench-sweep was not given
    load: float | None = None  # the 1-minute load average once collected, before anything is timed


RUN = Run()


def pytest_configure(config):
    config.addinivalue_line("markers", "sweep: a benchmark case timed only with --bench-sweep")
    config.addinivalue_line("markers", "cuda_only(reason): a benchmark provider left out without a CUDA GPU, and why")


@pytest.hookimpl(trylast=True)  # after -k and -m: count and record only the cases they kept
def pytest_collection_modifyitems(config, items):
    """Leave out the sweep's cases unless ``--bench-sweep``, and without a GPU the ``cuda_only`` ones."""
    RUN.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    sweep = config.getoption("bench_sweep", False)
    kept, left_out = [], []
    for item in items:
        cuda_only = None if ON_GPU else item.get_closest_marker("cuda_only")
        if item.get_closest_marker("sweep") is not None and not sweep:
            RUN.sweep_only += 1
        elif cuda_only is not None:
            RUN.not_run.append({**_group_and_provider(item), "reason": cuda_only.kwargs["reason"]})
        else:
            kept.append(item)
            continue
        left_out.append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept


def _group_and_provider(item) -> dict:
    marker = item.get_closest_marker("benchmark")
    params = getattr(getattr(item, "callspec", None), "params", {})
    return {"group": marker.kwargs.get("group") if marker else None, "provider": params.get("provider")}


@pytest.fixture(scope="session")
def machine_limits(request) -> MachineLimits | None:
    """The compute and bandwidth ceilings of this device, measured once; None when nothing is timed."""
    if request.config.getoption("benchmark_disable"):
        return None
    limits = measure_limits(DEVICE)
    RUN.limits = dataclasses.asdict(limits)
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
        **({"limits": RUN.limits} if RUN.limits else {}),
        "skipped": RUN.skipped + RUN.not_run,
    }


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each timed benchmark's median and each skipped one's reason, by group: the closing table
    shows both, and the JSON lists only what ran."""
    outcome = yield
    report = outcome.get_result()
    if item.get_closest_marker("benchmark") is None:
        return
    named = _group_and_provider(item)
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        RUN.skipped.append({**named, "reason": reason.removeprefix("Skipped: ")})
    elif report.when == "call" and report.passed:
        info = getattr(item.funcargs.get("benchmark"), "extra_info", {})
        if "median_s" in info:
            RUN.timed.setdefault(named["group"], []).append(
                {"provider": named["provider"], "role": info.get("role"), "median_s": info["median_s"], "tflops": info.get("tflops")}
            )


@pytest.hookimpl(tryfirst=True)
def pytest_terminal_summary(terminalreporter, config):
    """One narrow table per group, then what was left out and why, a line each.

    Runs before pytest-benchmark's own summary, which it quiets (its tables are up to ~250
    characters wide): ``--benchmark-verbose`` keeps them, ``--benchmark-json`` keeps every statistic.
    """
    session = getattr(config, "_benchmarksession", None)
    if session is not None and not config.getoption("benchmark_verbose", False):
        session.quiet = True
    if not (RUN.timed or RUN.skipped or RUN.not_run or RUN.sweep_only):
        return
    width = config.get_terminal_writer().fullwidth
    terminalreporter.write_sep("-", "vitriton benchmarks")
    for line in summary_lines(width):
        terminalreporter.write_line(line)


def summary_lines(width: int) -> list[str]:
    """The device, then a table per group in the order they ran, then what was left out."""
    lines = []
    if RUN.timed:
        where = torch.cuda.get_device_name() if ON_GPU else f"cpu: {cpu_line()}, {torch.get_num_threads()} torch threads"
        if RUN.load is not None:  # other work on the machine makes the medians noisy, the CPU's most of all
            where += f", load {RUN.load:.1f} on {os.cpu_count()} cores"
        lines += [where, "median: per call, warm-up excluded; vs peer: the fastest peer's median / this one"]
    skipped: dict[str, list[dict]] = {}
    for skip in RUN.skipped:
        skipped.setdefault(skip["group"], []).append(skip)
    names = [row["provider"] for rows in RUN.timed.values() for row in rows] + [s["provider"] for s in RUN.skipped]
    name_width = max(map(len, ["provider", *names]))
    for group in dict.fromkeys([*RUN.timed, *skipped]):
        lines += ["", group, *group_table(RUN.timed.get(group, []), skipped.get(group, []), name_width, width)]
    if RUN.timed or RUN.skipped:
        lines.append("")
    lines += left_out_lines(width)
    return lines


def group_table(rows: list[dict], skips: list[dict], name_width: int, width: int) -> list[str]:
    peers = [row["median_s"] for row in rows if row["role"] == "peer"]
    best = min(peers, default=None)
    lines = [f"  {'provider':<{name_width}}  {'role':<9} {'median':>10} {'TFLOP/s':>8} {'vs peer':>8}"] if rows else []
    for row in sorted(rows, key=lambda row: (ROLE_ORDER.get(row["role"], 3), row["median_s"])):
        vs_peer = "—" if best is None else f"{best / row['median_s']:.2f}x"
        lines.append(
            f"  {row['provider']:<{name_width}}  {row['role']:<9} {seconds(row['median_s']):>10} "
            f"{number(row['tflops']):>8} {vs_peer:>8}"
        )
    for skip in skips:
        reason = skip["reason"].removeprefix(f"{skip['provider']}: ")
        lines.append(_shortened(f"  {skip['provider']:<{name_width}}  skipped: {reason}", width))
    return lines


def left_out_lines(width: int) -> list[str]:
    """Without a GPU, one line per reason (our Triton kernels first); then what the sweep would add."""
    by_reason: dict[str, list[dict]] = {}
    for entry in sorted(RUN.not_run, key=lambda entry: entry["reason"] != TRITON_NEEDS_GPU):
        by_reason.setdefault(entry["reason"], []).append(entry)
    lines = []
    for reason, entries in by_reason.items():
        providers = ", ".join(dict.fromkeys(entry["provider"] for entry in entries))
        which = "" if reason == TRITON_NEEDS_GPU else f" ({providers})"  # that reason names them
        cases = f"{len(entries)} case{'s' if len(entries) > 1 else ''}"
        lines += textwrap.wrap(f"{cases} not timed{which}: {reason}", width, subsequent_indent="  ")
    if RUN.sweep_only:
        lines.append(f"{RUN.sweep_only} more cases with --bench-sweep (every shape, batch, dtype and pass)")
    return lines


def _shortened(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
