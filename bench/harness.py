"""How every benchmark here runs: where, how a call is warmed up and timed, and what it records.

Each benchmark hands ``measure`` a function that does one whole unit of work (a forward, a
forward and backward, a training step) and ends by synchronising the device, so the wall time
pytest-benchmark takes around it (``time.perf_counter``) is the time the GPU needed, launch
overheads included, as a user would see it. Warm-up calls (``torch.compile``, Triton autotuning,
cuDNN algorithm search, the allocator's first allocations) run before the fixture times anything.

"Triton available" means a CUDA GPU: ``torch.cuda.is_available()``. On a CPU-only machine
tests/conftest.py turns on Triton's interpreter (TRITON_INTERPRET=1) when tests/ is collected
too, but the interpreter is a correctness tool, far too slow to time, so the bench never uses it.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import platform
import warnings

import pytest
import torch

from bench.roofline import MachineLimits, Work

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# Why a provider is not timed on a CPU-only machine (bench/conftest.py says each once, not per case).
TRITON_NEEDS_GPU = "Triton needs a CUDA GPU (its CPU interpreter times numpy)"
NEEDS_GPU = "needs a CUDA GPU"
COMPILED_ON_GPU_ONLY = "compiled runs are timed on a GPU only (compiling would dominate a CPU run)"
WARMUP_CALLS = 3  # the first compiles/autotunes; the next two settle caches and the allocator
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
TIMING = "wall clock of one call ending in a device synchronise; median of the rounds; warm-up excluded"


@functools.cache
def cpu_kind() -> dict:
    """The CPU's model name and whether it has bfloat16 matrix units (AMX, flag ``amx_bf16``) and
    bfloat16 dot-product instructions (``avx512_bf16``), from /proc/cpuinfo; None where unknown.

    They decide what bfloat16 costs on the CPU: SDPA's CPU kernel multiplies bfloat16 through
    oneDNN, several times faster than float32 with AMX, and the same ratio to it means different
    absolute times on each kind.
    """
    model, flags = None, None
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and flags is None:
                    flags = set(value.split())
                if model is not None and flags is not None:
                    break
    except OSError:
        pass
    return {
        "model": model or platform.processor() or platform.machine(),
        **{flag: None if flags is None else flag in flags for flag in ("amx_bf16", "avx512_bf16")},
    }


def cpu_line() -> str:
    """``cpu_kind`` in one line: "AMD EPYC (amx_bf16: no, avx512_bf16: yes)"."""
    kind = cpu_kind()
    said = {True: "yes", False: "no", None: "unknown"}
    return f"{kind['model']} (amx_bf16: {said[kind['amx_bf16']]}, avx512_bf16: {said[kind['avx512_bf16']]})"


def synchronize() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


class BenchCase:
    """What the benchmark cases share (frozen dataclasses with ``shape``, the model the sizes come
    from, ``batch``, ``dtype`` and ``backward``): the pass, the pytest-benchmark group, the id and
    the JSON record, built from the class's ``OP`` and the case's own sizes (``size_text`` in the
    group, ``size_id`` in the id, ``size_record`` in the record)."""

    OP = ""
    DEVICE_NOTE = ""  # a device the case runs on whatever the machine has ("cpu"), else ""

    @property
    def passes(self) -> str:
        return "fwd+bwd" if self.backward else "fwd"

    @property
    def group(self) -> str:
        where = f" {self.DEVICE_NOTE}" if self.DEVICE_NOTE else ""
        return f"{self.OP} {self.shape} B={self.batch} {self.size_text()} {DTYPE_NAMES[self.dtype]} {self.passes}{where}"

    @property
    def id(self) -> str:
        name = self.shape.lower().replace("/", "").replace("-", "_")
        return f"{name}-{self.size_id()}-b{self.batch}-{DTYPE_NAMES[self.dtype]}-{self.passes}"

    def record(self) -> dict:
        where = {"device": self.DEVICE_NOTE} if self.DEVICE_NOTE else {}
        return {"op": self.OP, "shape": self.shape, "batch": self.batch, **self.size_record(),
                "dtype": DTYPE_NAMES[self.dtype], "pass": self.passes, **where}


def case_marks(case, in_default: bool) -> list:
    """Its benchmark group, and ``sweep`` when it is timed only under ``--bench-sweep``."""
    return [pytest.mark.benchmark(group=case.group)] + ([] if in_default else [pytest.mark.sweep])


def case_params(cases: dict, in_default) -> list:
    """One pytest parameter per case: its id (readable in the JSON), its benchmark group, and the
    ``sweep`` mark unless ``in_default(case)``: the default run times a few representative sizes."""
    return [pytest.param(case_id, id=case_id, marks=case_marks(case, in_default(case))) for case_id, case in cases.items()]


def provider_params(providers: dict) -> list:
    """One pytest parameter per provider of ``{name: (role, why it cannot run on a CPU, or None)}``;
    those that cannot are marked ``cuda_only(reason)``: left out on a CPU-only machine."""
    return [
        pytest.param(name, id=name, marks=[pytest.mark.cuda_only(reason=reason)] if reason else [])
        for name, (_, reason) in providers.items()
    ]


@contextlib.contextmanager
def cudnn_autotuned():
    """Let cuDNN pick its fastest convolution algorithm (``cudnn.benchmark``), then restore the setting.

    The convolution peers are measured at their best, as a tuned training script runs them.
    """
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _one_line(text, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_call(fn, may_refuse: bool) -> str | None:
    """Run ``fn`` once. Returns None if it ran, else why it could not (a peer refusing, or OOM).

    Out of memory skips any provider: the case is too big for this GPU, not wrong. Any other
    error fails our own providers, and skips a peer with the reason it gave, including the
    warnings PyTorch emits to explain a refused SDPA backend ("Flash attention kernel not used
    because ...").
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
            return None
        except torch.cuda.OutOfMemoryError as error:
            return f"out of GPU memory at this size: {_one_line(error, 160)}"
        except Exception as error:
            if not may_refuse:
                raise
            said = [_one_line(w.message, 200) for w in caught if issubclass(w.category, UserWarning)]
            return _one_line(f"{type(error).__name__}: {error}" + "".join(f" | {s}" for s in said[:4]), 600)


def _refusal_text(refusals: dict[str, str]) -> str:
    """One line; the reason once when every form of the inputs was refused for the same one."""
    if len(set(refusals.values())) == 1:
        return f"[{', '.join(refusals)}] {next(iter(refusals.values()))}"
    return "; ".join(f"[{inputs}] {reason}" for inputs, reason in refusals.items())


def _first_that_runs(candidates, may_refuse: bool):
    """The first of ``candidates`` whose first call runs: (inputs, fn, refusals); fn None if none ran."""
    refusals = {}  # inputs -> why they were refused
    for inputs, fn in candidates:
        reason = _first_call(fn, may_refuse)
        if reason is None:
            return inputs, fn, refusals
        refusals[inputs] = reason
        gc.collect()  # a failed call (OOM) can leave large tensors in its traceback's frames
        if ON_GPU:
            torch.cuda.empty_cache()
    return None, None, refusals


def measure(
    benchmark,
    candidates: list[tuple[str, object]],
    *,
    provider: str,
    role: str,
    work: Work,
    limits: MachineLimits | None,
    case: dict,
    context=None,
) -> float | None:
    """Warm up, time and record the first of ``candidates`` that runs; its median seconds per call.

    ``candidates``: ``[(how the inputs are given, fn)]``, tried in order: a peer that refuses the
    strided views of a fused qkv can still be timed on contiguous copies, made inside its timed
    call. ``role``: "ours", "reference" or "peer"; a peer's refusal is a skip with its reason.
    ``context``: entered around warm-up and timing (a forced SDPA backend), outside each call.
    ``case``: the shape and pass, kept in ``extra_info`` for ``bench/results_table.py``.
    Returns None under ``--benchmark-disable``, where nothing is timed.
    """
    benchmark.extra_info.update(provider=provider, role=role, case=case, flops=work.flops, bytes=work.bytes)
    may_refuse = role == "peer"
    with context if context is not None else contextlib.nullcontext():
        if benchmark.disabled:
            # --benchmark-disable (the CI smoke run): the first call, through the fixture, and no timing.
            inputs, fn, refusals = benchmark(_first_that_runs, candidates, may_refuse)
        else:
            inputs, fn, refusals = _first_that_runs(candidates, may_refuse)  # compile, autotune
        if refusals:
            benchmark.extra_info["refused"] = refusals
        if fn is None:
            pytest.skip(f"{provider}: {_refusal_text(refusals)}")
        benchmark.extra_info["inputs"] = inputs
        if benchmark.disabled:
            return None
        for _ in range(WARMUP_CALLS - 1):
            fn()
        if ON_GPU:
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
        benchmark(fn)
    median = benchmark.stats.stats.median  # seconds per call, from the rounds just timed
    info = {"median_s": median, "timing": TIMING}
    if limits is not None:
        info.update(limits.describe(work, median))
    if ON_GPU:
        info["resident_gib"] = resident / 2**30  # allocated before timing: weights, optimizer state, inputs
        info["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    benchmark.extra_info.update(info)
    return median
