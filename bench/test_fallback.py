"""The einsum fallback on the CPU against PyTorch's SDPA: what ``backend="einsum"`` costs there.

``kernels.reference.attention_fallback``, the function ``kernels.attention(..., backend="einsum")``
runs, called directly, beside ``torch.nn.functional.scaled_dot_product_attention`` on the same
inputs, on the CPU whatever else the machine has. One group per (shape, batch, dtype, pass); the
inputs as a ViT makes them, views of one fused qkv (B, N, 3, H, D) permuted to (B, H, N, D), and
the backward is the gradient of qkv (``timed_unit`` of bench/test_attention.py).

ViT-B/16 heads (H = 12, D = 64) at N = 197 (224 px) and 577 (384 px), batch 1 and 8, float32 and
bfloat16, forward and forward + backward; and one long sequence (N = 4096, batch 1, forward),
where the fallback's bounded memory matters. By default only N = 197 at batch 1 (four groups);
``--bench-sweep`` times them all. There ``extra_info`` holds each provider's peak:
the most bytes of tensors its ops held at once (``PeakMemory`` of tests/test_fallback.py, one
untimed call); memory a kernel uses inside itself without a tensor (SDPA's per-thread buffers)
is not seen. The fallback's ``extra_info["fallback_over_sdpa"]`` is its median over SDPA's in the
same group (SDPA runs first). The bfloat16 ratios depend on the CPU kind: with AMX (``amx_bf16``)
SDPA makes all its products in bfloat16, several times faster than float32, where the fallback
makes only p v and p^T grad_out so (its logits and dS products stay float32, see
kernels/reference.py). So the table that closes the run names the CPU, and each result keeps
``extra_info["cpu"]`` (model, ``amx_bf16``, ``avx512_bf16``) and ``extra_info["torch_threads"]``.

    pytest bench/test_fallback.py --benchmark-only --bench-sweep
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from bench.harness import case_marks, cpu_kind, measure
from bench.roofline import attention_work
from bench.test_attention import Case as AttentionCase
from bench.test_attention import heads_first, timed_unit
from kernels.reference import attention_fallback
from tests.test_fallback import PeakMemory

CPU = torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class Case(AttentionCase):
    OP = "fallback"
    DEVICE_NOTE = "cpu"

    @property
    def long(self) -> bool:
        return self.tokens > 1024


CASE_LIST = [
    Case(shape, 12, tokens, 64, batch, dtype, backward)
    for shape, tokens in (("ViT-B/16", 197), ("ViT-B/16-384", 577))
    for batch in (1, 8)
    for dtype in (torch.float32, torch.bfloat16)
    for backward in (False, True)
] + [Case("long", 12, 4096, 64, 1, torch.float32, False)]
CASES = {case.id: case for case in CASE_LIST}


def in_default(case: Case) -> bool:
    """Timed without ``--bench-sweep``: ViT-B/16 at 224 px, batch 1."""
    return case.tokens == 197 and case.batch == 1


# provider -> (role, attend(q, k, v)); SDPA first, so the fallback's ratio to it is known when it runs.
PROVIDERS = {
    "sdpa": ("peer", F.scaled_dot_product_attention),
    "einsum-fallback": ("ours", attention_fallback),
}
SDPA_MEDIANS: dict[str, float] = {}  # group -> SDPA's median seconds, this session


def parameters() -> list:
    """(case, provider) in the order they must run: SDPA, then the fallback, group by group."""
    return [
        pytest.param(case_id, provider, id=f"{case_id}-{provider}", marks=case_marks(case, in_default(case)))
        for case_id, case in CASES.items()
        for provider in PROVIDERS
    ]


@pytest.mark.parametrize("case_id, provider", parameters())
def test_fallback(benchmark, machine_limits, case_id: str, provider: str):
    case = CASES[case_id]
    role, attend = PROVIDERS[provider]
    b, n, h, d = case.batch, case.tokens, case.heads, case.head_dim
    qkv = torch.randn(b, n, 3, h, d, device=CPU, dtype=case.dtype, requires_grad=case.backward)  # (B, N, 3, H, D)
    grad_out = torch.randn(b, h, n, d, device=CPU, dtype=case.dtype) if case.backward else None
    median = measure(
        benchmark,
        [("views", timed_unit(lambda qkv: attend(*heads_first(qkv)), qkv, grad_out))],
        provider=provider,
        role=role,
        work=attention_work(b, h, n, n, d, case.dtype, case.backward),
        limits=machine_limits,
        case=case.record(),
    )
    benchmark.extra_info.update(cpu=cpu_kind(), torch_threads=torch.get_num_threads())
    if median is None:  # --benchmark-disable: nothing timed, nothing to compare
        return
    if provider == "sdpa":
        SDPA_MEDIANS[case.group] = median
    elif case.group in SDPA_MEDIANS:
        benchmark.extra_info["fallback_over_sdpa"] = median / SDPA_MEDIANS[case.group]
    if case.long:
        with torch.no_grad(), PeakMemory() as held:
            attend(*heads_first(qkv))
        scores = b * h * n * n * 4  # one float32 (B, H, N, N) score matrix
        benchmark.extra_info.update(
            peak_memory_mib=held.peak / 2**20,
            peak_memory_gib=held.peak / 2**30,
            peak_memory_vs_scores=held.peak / scores,
            peak_memory_how="most bytes of tensors the call's ops held at once (PeakMemory), one untimed call",
        )
