"""The fused attention backward (``kernels/triton/attention_bwd_fused.py``: one kernel, dQ by atomic
adds) against the float64 reference, and the rule that picks it over the pair of kernels.

The equivalence tests force the fused kernel (``fused`` fixture: the switch-over length at 0 and
every input taken as fitting) and compare the output and every gradient with the reference by the
rule every kernel test uses (``tests.attention.test_triton.check_against_reference``, the
tolerances of ``tests.equivalence``): each mask kind, causal, dropout (the reference given the
forward's own keep mask, so the backward must redraw exactly it), the bias gradient, packed
sequences, split head dims, Nq != Nk, every dtype; lengths past one block of keys, so several
programs add into the same dQ rows. Each asserts that the fused kernel ran and the pair did not.
Then the rule (``kernels.triton.launch._fused_backward_wanted``): the pair under
``torch.use_deterministic_algorithms(True)``, the fused kernel from ``FUSED_BACKWARD_MIN_KEYS``
keys where its machine code is clean, the pair below and elsewhere; launches recorded, not run.
On a CPU the kernels run in Triton's interpreter (tests/conftest.py), on a GPU compiled.
"""

import contextlib
from typing import ClassVar

import pytest
import torch

from kernels.triton import attention_bwd_fused, launch
from kernels.triton.attention_ops import attention_triton, attention_varlen_triton
from tests.attention.test_triton import (
    check_against_reference,
    check_dropout,
    make_inputs,
)
from tests.attention.test_varlen_triton import check_varlen, cu_seqlens, packed_inputs
from tests.equivalence import DEVICE

f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
FUSED, KV, Q = "_attention_backward_fused_kernel", "_attention_backward_kv_kernel", "_attention_backward_q_kernel"
pytestmark = pytest.mark.interpreter


def _name(kernel) -> str:
    while hasattr(kernel, "fn"):  # an Autotuner wraps the JITFunction, which wraps the Python function
        kernel = kernel.fn
    return kernel.__name__


@pytest.fixture
def launched(monkeypatch) -> list[str]:
    """The names of the kernels launched through ``torch.library.wrap_triton``, in order; they still run."""
    names, wrap = [], torch.library.wrap_triton

    def spy(kernel):
        names.append(_name(kernel))
        return wrap(kernel)

    monkeypatch.setattr(torch.library, "wrap_triton", spy)
    return names


@pytest.fixture
def fused(monkeypatch, launched) -> list[str]:
    """Every backward takes the fused kernel (but under deterministic mode, or with a strided head
    dim); returns the launched kernels' names."""
    monkeypatch.setattr(launch, "FUSED_BACKWARD_MIN_KEYS", 0)
    monkeypatch.setattr(launch, "_fused_backward_fits", lambda *args: True)
    return launched


def assert_took_fused(launched):
    assert FUSED in launched and KV not in launched and Q not in launched, launched


# ---------------------------------------------------------------------------------------------
# Equivalence with the float64 reference, the fused kernel forced.

# (batch, heads, Nq, Nk, D, Dv, dtype): whole and partial blocks of the interpreter's config (64
# query rows, 32 keys), Nq != Nk both ways, Dv != D, each dtype (fp32: exact dots).
CASES = [
    pytest.param(1, 2, 64, 96, 64, 64, bf16, id="whole-blocks-bf16"),
    pytest.param(2, 2, 100, 100, 64, 64, f16, id="N100-f16"),
    pytest.param(1, 2, 70, 45, 32, 32, f32, id="Nq70-Nk45-f32"),
    pytest.param(1, 2, 37, 90, 64, 32, bf16, id="Nq37-Nk90-D64-Dv32-bf16"),
    pytest.param(1, 1, 1, 70, 16, 16, f16, id="Nq1-Nk70-f16"),
    pytest.param(1, 1, 70, 1, 16, 24, f32, id="Nq70-Nk1-f32"),
    pytest.param(1, 2, 33, 40, 128, 128, f16, id="D128-f16"),
]


@pytest.mark.parametrize("batch, heads, seqlen_q, seqlen_k, head_dim, head_dim_v, dtype", CASES)
def test_matches_reference(fused, batch, heads, seqlen_q, seqlen_k, head_dim, head_dim_v, dtype):
    check_against_reference(make_inputs(batch, heads, seqlen_q, seqlen_k, head_dim, dtype, head_dim_v=head_dim_v))
    assert_took_fused(fused)


@pytest.mark.parametrize(
    "mask, dtype",
    [
        pytest.param(("bool", (1, 2, 45, 70), torch.bool), f16, id="bool-(1,H,Nq,Nk)-f16"),
        pytest.param(("bool", (70,), torch.bool), bf16, id="bool-(Nk)-bf16"),
        pytest.param(("float", (2, 1, 45, 70), f32), bf16, id="float32-bias-(B,1,Nq,Nk)-bf16"),
        pytest.param(("float", (1, 2, 1, 70), f16), f16, id="f16-bias-(1,H,1,Nk)"),
        pytest.param(("float", (45, 70), f32), f32, id="float32-bias-(Nq,Nk)-f32"),
    ],
)
def test_masks_and_the_bias_gradient(fused, mask, dtype):
    """Each mask kind; a float bias gets its gradient from the fused kernel's d(logits) tile."""
    inputs = make_inputs(2, 2, 45, 70, 32, dtype, mask=mask)
    _, ours, _ = check_against_reference(inputs)
    assert_took_fused(fused)
    if mask[0] == "float":
        assert ours["mask"].grad.shape == mask[1] and ours["mask"].grad.dtype == mask[2]


def test_float_bias_without_gradient(fused):
    inputs = make_inputs(1, 2, 30, 70, 32, f16, mask=("float", (1, 2, 30, 70), f16))
    _, ours, _ = check_against_reference(inputs, bias_grad=False)
    assert ours["mask"].grad is None
    assert_took_fused(fused)


@pytest.mark.parametrize(
    "seqlen_q, seqlen_k, dtype, mask",
    [
        pytest.param(100, 100, f16, None, id="N100-f16"),
        pytest.param(20, 75, bf16, None, id="Nq20-Nk75-bf16"),
        pytest.param(75, 20, f32, None, id="Nq75-Nk20-f32"),
        pytest.param(45, 70, bf16, ("float", (45, 70), f32), id="Nq45-Nk70-bias-bf16"),
        pytest.param(70, 45, f16, ("bool", (1, 2, 70, 45), torch.bool), id="Nq70-Nk45-bool-f16"),
    ],
)
def test_causal(fused, seqlen_q, seqlen_k, dtype, mask):
    check_against_reference(make_inputs(1, 2, seqlen_q, seqlen_k, 32, dtype, mask=mask), is_causal=True)
    assert_took_fused(fused)


@pytest.mark.parametrize(
    "dtype, dropout_p, mask, is_causal",
    [
        pytest.param(f32, 0.3, None, False, id="f32-p0.3"),
        pytest.param(f16, 0.5, ("float", (1, 2, 1, 70), f16), False, id="f16-p0.5-bias"),
        pytest.param(bf16, 0.2, ("bool", (45, 70), torch.bool), True, id="bf16-p0.2-bool-causal"),
    ],
)
def test_dropout_redraws_the_forwards_keep_mask(fused, dtype, dropout_p, mask, is_causal):
    """The reference is given the keep mask the forward drew: the gradients match only if the fused
    backward drew the very same one."""
    check_dropout(make_inputs(2, 2, 45, 70, 32, dtype, mask=mask), dropout_p, is_causal=is_causal)
    assert_took_fused(fused)


@pytest.mark.parametrize("head_dim", [40, 72, 80])
@pytest.mark.parametrize("dtype", [f16, bf16])
def test_split_head_dims(fused, head_dim, dtype):
    """Head dims in two pieces (32 + 16, 64 + 16): each piece's dQ is added, the second masked past D."""
    assert launch._head_dim_split(head_dim, head_dim, False) is not None
    check_against_reference(make_inputs(1, 2, 70, 45, head_dim, dtype, seed=head_dim))
    assert_took_fused(fused)


def test_split_head_dim_with_bias_causal_and_dropout(fused):
    inputs = make_inputs(1, 2, 45, 70, 72, bf16, mask=("float", (1, 2, 45, 70), f32), seed=7)
    check_dropout(inputs, 0.2, is_causal=True)
    assert_took_fused(fused)


# (lengths_q, lengths_k): empty and one-token sequences, queries without keys and keys without queries,
# sequences over one block.
VARLEN = [
    pytest.param([5, 1, 0, 17, 70], [5, 1, 0, 17, 70], id="self"),
    pytest.param([3, 40, 2], [33, 1, 70], id="cross"),
    pytest.param([4, 2, 0], [0, 6, 3], id="no-keys-no-queries"),
]


@pytest.mark.parametrize("lengths_q, lengths_k", VARLEN)
@pytest.mark.parametrize("dtype", [f16, bf16, f32])
def test_varlen(fused, lengths_q, lengths_k, dtype):
    check_varlen(lengths_q, lengths_k, packed_inputs(lengths_q, lengths_k, 2, 16, dtype, head_dim_v=24))
    if sum(lengths_q) and sum(lengths_k):
        assert_took_fused(fused)


@pytest.mark.parametrize("is_causal, dropout_p", [(True, 0.0), (False, 0.3), (True, 0.3)])
def test_varlen_causal_and_dropout(fused, is_causal, dropout_p):
    lengths_q, lengths_k = [19, 1, 40], [19, 5, 70]
    tensors = packed_inputs(lengths_q, lengths_k, 2, 32, f16)
    check_varlen(lengths_q, lengths_k, tensors, is_causal=is_causal, dropout_p=dropout_p)
    assert_took_fused(fused)


@pytest.mark.parametrize("head_dim", [72, 80])
def test_varlen_fused_qkv_views_at_split_head_dims(fused, head_dim):
    lengths = [20, 7, 70]
    check_varlen(lengths, lengths, packed_inputs(lengths, lengths, 2, head_dim, bf16, fused_qkv=True), scale=0.3)
    assert_took_fused(fused)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(attention_bwd_fused.BACKWARD_FUSED_CONFIGS)))
def test_every_autotune_config_computes_the_same(fused, index, monkeypatch):
    """Whichever config the autotuner picks on a GPU: lengths that are no multiple of any block, a
    bias gradient and causal; then no mask (the lean body) with whole and partial row blocks."""
    config = attention_bwd_fused.BACKWARD_FUSED_CONFIGS[index]
    monkeypatch.setattr(attention_bwd_fused._attention_backward_fused_kernel, "configs", [config])
    seqlen_q, seqlen_k = (70, 150) if index % 2 else (150, 70)
    inputs = make_inputs(1, 2, seqlen_q, seqlen_k, 64, f16, mask=("float", (1, 2, 1, seqlen_k), f32), seed=index)
    check_against_reference(inputs, is_causal=True)
    check_against_reference(make_inputs(1, 2, 128, 150, 80, bf16, seed=index))
    assert_took_fused(fused)


def test_autotuning_zeroes_the_dq_sums_after_timing_runs():
    """On a GPU the autotuner runs each config several times, each adding into the dQ sums: it must
    zero them before the real launch (Triton's ``reset_to_zero``, which torch.compile honours too)."""
    assert attention_bwd_fused._attention_backward_fused_kernel.reset_to_zero == ["grad_q_ptr"]


def test_parameters_within_the_pairs():
    """Strides stay flat scalar arguments (torch.compile cannot pass tuples); the count stays within
    the dK/dV kernel's."""
    from kernels.triton.attention_bwd import _attention_backward_kv_kernel

    fused_count = len(attention_bwd_fused._attention_backward_fused_kernel.fn.arg_names)
    assert fused_count <= len(_attention_backward_kv_kernel.fn.arg_names)


# ---------------------------------------------------------------------------------------------
# The rule.


@contextlib.contextmanager
def deterministic_algorithms():
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def test_deterministic_mode_takes_the_pair(launched, monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the pair runs where the fused kernel would
    otherwise (switch-over at 0 keys), and gives the same gradients on a second run, bit for bit."""
    monkeypatch.setattr(launch, "FUSED_BACKWARD_MIN_KEYS", 0)
    inputs = make_inputs(1, 2, 45, 70, 32, f16)
    gradients = []
    with deterministic_algorithms():
        for _ in range(2):
            q, k, v = (inputs[name].detach().clone().requires_grad_() for name in "qkv")
            out = attention_triton(q, k, v)
            out.backward(torch.ones_like(out))  # not out.sum(): its upstream gradient has a head-dim stride of 0
            gradients.append((q.grad, k.grad, v.grad))
    assert FUSED not in launched and KV in launched and Q in launched, launched
    assert all(torch.equal(a, b) for a, b in zip(*gradients))
    launched.clear()
    out = attention_triton(*(inputs[name].detach().clone().requires_grad_() for name in "qkv"))
    out.backward(torch.ones_like(out))
    assert_took_fused(launched)  # the same call outside deterministic mode


def test_deterministic_mode_takes_the_pair_for_packed_sequences(launched, monkeypatch):
    monkeypatch.setattr(launch, "FUSED_BACKWARD_MIN_KEYS", 0)
    lengths = [20, 45]
    q, k, v = (t.requires_grad_() for t in packed_inputs(lengths, lengths, 2, 32, bf16))
    with deterministic_algorithms():
        out = attention_varlen_triton(q, k, v, cu_seqlens(lengths), cu_seqlens(lengths), 45, 45)
        out.backward(torch.ones_like(out))
    assert FUSED not in launched and KV in launched, launched


def test_a_strided_head_dim_takes_the_pair(fused):
    """The fused kernel takes no head-dim strides: q stored column by column goes to the pair (so
    does ``out.sum().backward()``, whose upstream gradient has strides of 0)."""
    inputs = make_inputs(1, 2, 45, 70, 32, f16)
    q = inputs["q"].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert q.stride(-1) != 1
    check_against_reference({**inputs, "q": q})
    assert FUSED not in fused and KV in fused, fused


class RecordLaunch:
    """Stands in for ``torch.library.wrap_triton``: records the kernel's name, launches nothing."""

    names: ClassVar[list] = []

    def __init__(self, kernel):
        RecordLaunch.names.append(_name(kernel))

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def backward_kernels(monkeypatch, batch, heads, seqlen, head_dim, dtype, **options) -> str:
    """"fused" or "pair": what a forward and backward at this shape launch (recorded, not run)."""
    monkeypatch.setattr(torch.library, "wrap_triton", RecordLaunch)
    RecordLaunch.names = []
    qkv = torch.zeros(batch, seqlen, 3, heads, head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) views, as a ViT makes them
    out = attention_triton(q, k, v, **options)
    out.backward(torch.ones_like(out))
    taken = {"fused" if name == FUSED else "pair" for name in RecordLaunch.names if name in (FUSED, KV, Q)}
    assert len(taken) == 1, RecordLaunch.names
    return taken.pop()


@pytest.mark.parametrize(
    "seqlen, head_dim, dtype, options, expected",
    [
        pytest.param(577, 64, bf16, {}, "fused", id="vit-l16-384"),
        pytest.param(729, 72, f16, {}, "fused", id="siglip-split-64+16"),
        pytest.param(512, 32, f16, {"is_causal": True}, "fused", id="at-the-switch-over-causal"),
        pytest.param(197, 64, bf16, {}, "pair", id="vit-b16"),
        pytest.param(257, 80, bf16, {}, "pair", id="vit-h14"),
        pytest.param(511, 64, f16, {}, "pair", id="below-the-switch-over"),
        pytest.param(577, 64, f32, {}, "pair", id="fp32"),
        pytest.param(577, 64, bf16, {"dropout_p": 0.1}, "pair", id="dropout"),
        pytest.param(577, 96, bf16, {}, "pair", id="D96"),
        pytest.param(577, 128, bf16, {}, "pair", id="D128"),
        pytest.param(577, 80, bf16, {"is_causal": True}, "pair", id="split-with-causal"),
    ],
)
def test_default_rule(monkeypatch, seqlen, head_dim, dtype, options, expected):
    """From FUSED_BACKWARD_MIN_KEYS keys (512) the fused kernel, where its sm_90 code is clean
    (``launch._fused_backward_fits``); below it, and elsewhere, the pair."""
    assert launch.FUSED_BACKWARD_MIN_KEYS == 512
    assert backward_kernels(monkeypatch, 1, 1, seqlen, head_dim, dtype, **options) == expected


def test_rule_for_packed_sequences_reads_the_mean_length(monkeypatch):
    """Packed, the switch-over compares the mean keys per sequence (total_k / sequences, known without
    reading cu_seqlens back): two sequences of 600 and 500 keys take the fused kernel, 1000 and 10 the pair."""
    monkeypatch.setattr(torch.library, "wrap_triton", RecordLaunch)
    for lengths, expected in (([600, 500], FUSED), ([1000, 10], KV)):
        RecordLaunch.names = []
        qkv = torch.zeros(sum(lengths), 3, 1, 64, device=DEVICE, dtype=bf16, requires_grad=True)
        q, k, v = qkv.unbind(1)
        out = attention_varlen_triton(q, k, v, cu_seqlens(lengths), cu_seqlens(lengths), max(lengths), max(lengths))
        out.backward(torch.ones_like(out))
        assert expected in RecordLaunch.names, (lengths, RecordLaunch.names)
