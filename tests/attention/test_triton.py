"""The Triton attention kernels against the float64 reference: the output and every gradient.

On a machine without a GPU the kernels run in Triton's interpreter (tests/conftest.py) at small
shapes; on a GPU the same tests compile them and add the full ViT sizes. Each comparison uses the
shared rule of ``tests.equivalence`` with one upstream gradient for the kernel and both references.
"""

import math

import pytest
import torch
import torch.nn.functional as F
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels.checks import MAX_HEAD_DIM, MIN_HEAD_DIM
from kernels.reference import attention_reference
from kernels.triton import attention_ops as attention_module
from kernels.triton import configs as attention_configs
from kernels.triton.attention_bwd import _attention_backward_kv_kernel
from kernels.triton.attention_bwd_dq import _attention_backward_q_kernel
from kernels.triton.attention_fwd import _attention_forward_kernel
from kernels.triton.attention_ops import attention_grid, attention_triton
from tests.equivalence import DEVICE, DTYPES, ON_GPU, assert_close_to_reference

f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
needs_gpu = pytest.mark.gpu(reason="full ViT sizes: minutes in the interpreter, compiled on a GPU")
needs_cuda_for_compile = pytest.mark.gpu(
    reason="torch.compile of a triton_op needs CUDA: under the CPU interpreter its fake tensors have no data pointer",
)
# Every test here runs the kernels (in the interpreter on a CPU) but the few that check arguments,
# grids and errors. The fast subset (-m "not slow") keeps the cheap cases of each comparison.
pytestmark = pytest.mark.interpreter


def random_mask(kind, shape, dtype, generator):
    """A bool mask (True = may attend, 3 in 4) or a float bias of ``dtype`` with O(1) values."""
    if kind == "bool":
        return (torch.rand(shape, generator=generator) < 0.75).to(DEVICE)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * 0.7).to(DEVICE, dtype)


def make_inputs(batch, heads, seqlen_q, seqlen_k, head_dim, dtype, *, head_dim_v=None, mask=None, seed=0) -> dict:
    """q, k, v of ``dtype`` on DEVICE with O(1) entries; ``mask`` is None or (kind, shape, dtype)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype)

    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    return {
        "q": randn(batch, heads, seqlen_q, head_dim),
        "k": randn(batch, heads, seqlen_k, head_dim),
        "v": randn(batch, heads, seqlen_k, head_dim_v),
        "mask": None if mask is None else random_mask(*mask, generator),
    }


def leaves(inputs: dict, dtype=None, *, bias_grad=True) -> dict:
    """Fresh leaf copies in ``dtype`` (default: their own) that require grad; a bool mask stays bool."""
    copies = {}
    for name, t in inputs.items():
        if t is None or t.dtype == torch.bool:
            copies[name] = t
            continue
        copy = t.detach().to(dtype or t.dtype).clone()
        copies[name] = copy.requires_grad_(name != "mask" or bias_grad)
    return copies


def low_precision_copies(inputs: dict, *, bias_grad=True) -> dict:
    """The reference's inputs in the kernel's dtype. A float32 bias beside float16 q goes to float16
    too: the einsum reference cannot mix them, and the rule wants PyTorch's error in q's dtype."""
    copies = leaves(inputs, bias_grad=bias_grad)
    mask = copies["mask"]
    if mask is not None and mask.is_floating_point() and mask.dtype != copies["q"].dtype:
        copies["mask"] = leaves({"mask": inputs["mask"]}, copies["q"].dtype, bias_grad=bias_grad)["mask"]
    return copies


def gradients(tensors: dict) -> dict:
    return {name: t.grad for name, t in tensors.items() if t is not None and t.requires_grad}


def check_against_reference(
    inputs: dict, *, scale=None, dropout_p=0.0, is_causal=False, via_dispatch=False, bias_grad=True, seed=1
):
    """The kernel vs the reference in float64 and in the inputs' dtype: the output, then the gradient
    of q, k, v (and of a float mask) for one upstream gradient. With dropout the reference applies
    the kernel's own keep mask (through kernels.attention: the mask of the same torch seed).
    Returns (out, our leaves with .grad, keep mask)."""
    ours = leaves(inputs, bias_grad=bias_grad)
    options = {"scale": scale, "dropout_p": dropout_p, "is_causal": is_causal}
    torch.manual_seed(seed)
    if via_dispatch:
        out, keep = kernels.attention(**ours, **options, backend="triton"), None
        if dropout_p > 0.0:
            torch.manual_seed(seed)
            _, keep = attention_triton(**inputs, **options, return_dropout_mask=True)
    else:
        out, keep = attention_triton(**ours, **options, return_dropout_mask=True)
    assert out.shape == (*inputs["q"].shape[:3], inputs["v"].shape[-1]) and out.dtype == inputs["q"].dtype
    generator = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(DEVICE, out.dtype)
    out.backward(upstream)

    exact = leaves(inputs, torch.float64, bias_grad=bias_grad)
    low = low_precision_copies(inputs, bias_grad=bias_grad)
    out64 = attention_reference(**exact, **options, dropout_mask=keep)
    out_low = attention_reference(**low, **options, dropout_mask=keep)
    out64.backward(upstream.double())
    out_low.backward(upstream)

    assert_close_to_reference(out, out64, out_low, name="output")
    exact_grads, low_grads = gradients(exact), gradients(low)
    our_grads = gradients(ours)
    assert our_grads.keys() == exact_grads.keys()
    for name, grad in our_grads.items():
        assert grad.dtype == inputs[name].dtype
        assert_close_to_reference(grad, exact_grads[name], low_grads[name].to(grad.dtype), name=f"grad {name}")
    return out, ours, keep


# A covering set, not the cross product: each N in {1, 7, 64, 197, 257} with at least two head
# dims, each D in {16, 64, 80, 96, 128, 160, 256} with at least two lengths, Nq != Nk both ways,
# Dv != D, each dtype on several shapes, half of them through kernels.attention.
# (batch, heads, Nq, Nk, D, Dv, dtype, via_dispatch)
CASES = [
    pytest.param(1, 1, 1, 1, 64, 64, f32, False, id="N1-D64-f32"),
    pytest.param(2, 1, 1, 1, 16, 16, bf16, True, id="N1-D16-bf16-dispatch"),
    pytest.param(2, 2, 7, 7, 64, 64, f16, False, id="N7-D64-f16"),
    pytest.param(1, 2, 7, 7, 80, 80, bf16, True, id="N7-D80-bf16-dispatch"),
    pytest.param(1, 2, 64, 64, 16, 16, f32, True, id="N64-D16-f32-dispatch"),
    pytest.param(1, 1, 64, 64, 128, 128, f16, False, id="N64-D128-f16"),
    pytest.param(1, 1, 197, 197, 64, 64, bf16, False, id="N197-D64-bf16", marks=pytest.mark.slow),
    pytest.param(1, 1, 197, 197, 80, 80, f16, True, id="N197-D80-f16-dispatch", marks=pytest.mark.slow),
    pytest.param(1, 1, 257, 257, 96, 96, f32, False, id="N257-D96-f32", marks=pytest.mark.slow),
    pytest.param(1, 1, 257, 257, 64, 64, f16, True, id="N257-D64-f16-dispatch", marks=pytest.mark.slow),
    pytest.param(1, 2, 40, 33, 96, 96, bf16, False, id="Nq40-Nk33-D96-bf16"),
    pytest.param(1, 1, 33, 7, 128, 128, f32, True, id="Nq33-Nk7-D128-f32-dispatch"),
    pytest.param(2, 1, 7, 64, 16, 16, f16, False, id="Nq7-Nk64-D16-f16"),
    pytest.param(1, 1, 197, 1, 64, 64, f32, False, id="Nq197-Nk1-f32"),
    pytest.param(1, 1, 1, 197, 80, 80, bf16, False, id="Nq1-Nk197-D80-bf16"),
    pytest.param(1, 1, 37, 37, 160, 160, f16, False, id="N37-D160-f16"),
    pytest.param(1, 1, 7, 64, 160, 160, f32, True, id="Nq7-Nk64-D160-f32-dispatch"),
    pytest.param(1, 1, 33, 33, 256, 256, bf16, False, id="N33-D256-bf16"),
    pytest.param(1, 1, 1, 7, 256, 256, f32, False, id="Nq1-Nk7-D256-f32"),
    pytest.param(1, 2, 37, 45, 64, 32, f16, False, id="D64-Dv32-f16"),
    pytest.param(1, 1, 45, 37, 96, 160, bf16, True, id="D96-Dv160-bf16-dispatch"),
    pytest.param(1, 1, 20, 20, 24, 40, f32, False, id="D24-Dv40-f32"),
    pytest.param(3, 5, 20, 29, 32, 32, f16, True, id="B3-H5-f16-dispatch", marks=pytest.mark.slow),
    # The ViT shapes: ViT-B/16 at 224 (N=197, D=64), ViT-H/14 (N=257, D=80), ViT-B/16 at 384 (N=577).
    pytest.param(8, 12, 197, 197, 64, 64, f16, False, id="vit-b16-f16", marks=needs_gpu),
    pytest.param(8, 12, 197, 197, 64, 64, bf16, True, id="vit-b16-bf16-dispatch", marks=needs_gpu),
    pytest.param(8, 12, 197, 197, 64, 64, f32, False, id="vit-b16-f32", marks=needs_gpu),
    pytest.param(4, 16, 257, 257, 80, 80, bf16, False, id="vit-h14-bf16", marks=needs_gpu),
    pytest.param(4, 16, 257, 257, 80, 80, f16, True, id="vit-h14-f16-dispatch", marks=needs_gpu),
    pytest.param(2, 12, 577, 577, 64, 64, f16, False, id="vit-b16-384-f16", marks=needs_gpu),
    pytest.param(2, 8, 577, 577, 96, 96, bf16, False, id="N577-D96-bf16", marks=needs_gpu),
    pytest.param(2, 8, 577, 577, 96, 96, f32, True, id="N577-D96-f32-dispatch", marks=needs_gpu),
]


@pytest.mark.parametrize("batch, heads, seqlen_q, seqlen_k, head_dim, head_dim_v, dtype, via_dispatch", CASES)
def test_output_and_gradients_match_reference(batch, heads, seqlen_q, seqlen_k, head_dim, head_dim_v, dtype, via_dispatch):
    inputs = make_inputs(batch, heads, seqlen_q, seqlen_k, head_dim, dtype, head_dim_v=head_dim_v)
    out, _, _ = check_against_reference(inputs, via_dispatch=via_dispatch)
    # (B, Nq, H, Dv) memory: the output projection reads it as (B, Nq, H * Dv) without a copy.
    assert out.transpose(1, 2).is_contiguous()


def test_explicit_scale():
    check_against_reference(make_inputs(1, 2, 37, 45, 32, f32), scale=0.3)
    check_against_reference(make_inputs(1, 1, 20, 20, 64, bf16), scale=1.7, via_dispatch=True)


# Every broadcast shape of the contract, bool and float (float biases in q's dtype and in float32).
# (mask kind, mask shape as a function of (B, H, Nq, Nk), mask dtype, q dtype)
B, H, NQ, NK = 2, 2, 37, 45
MASK_CASES = [
    pytest.param("bool", (NK,), torch.bool, f16, id="bool-(Nk)"),
    pytest.param("bool", (NQ, NK), torch.bool, bf16, id="bool-(Nq,Nk)"),
    pytest.param("bool", (1, H, 1, NK), torch.bool, f32, id="bool-(1,H,1,Nk)"),
    pytest.param("bool", (B, 1, NQ, NK), torch.bool, f16, id="bool-(B,1,Nq,Nk)"),
    pytest.param("bool", (B, H, NQ, NK), torch.bool, bf16, id="bool-(B,H,Nq,Nk)"),
    pytest.param("float", (NK,), f32, f16, id="float32-bias-(Nk)-f16"),
    pytest.param("float", (NQ, NK), bf16, bf16, id="bf16-bias-(Nq,Nk)"),
    pytest.param("float", (1, H, 1, NK), f32, f32, id="float32-bias-(1,H,1,Nk)"),
    pytest.param("float", (B, 1, NQ, NK), f16, f16, id="f16-bias-(B,1,Nq,Nk)"),
    pytest.param("float", (B, H, NQ, NK), f32, bf16, id="float32-bias-(B,H,Nq,Nk)-bf16"),
    pytest.param("float", (H, 1, NK), f32, f32, id="float32-bias-(H,1,Nk)"),
]


@pytest.mark.parametrize("kind, shape, mask_dtype, dtype", MASK_CASES)
def test_masks_every_broadcast_shape(kind, shape, mask_dtype, dtype):
    inputs = make_inputs(B, H, NQ, NK, 32, dtype, mask=(kind, shape, mask_dtype))
    _, ours, _ = check_against_reference(inputs, via_dispatch=len(shape) == 2)
    if kind == "float":
        assert ours["mask"].grad.shape == shape and ours["mask"].grad.dtype == mask_dtype


def test_float_bias_without_gradient():
    inputs = make_inputs(1, 2, 30, 40, 32, f16, mask=("float", (1, 2, 30, 40), f16))
    _, ours, _ = check_against_reference(inputs, bias_grad=False)
    assert ours["mask"].grad is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", ["bool", "-inf bias"])
def test_rows_with_every_key_masked_give_zeros(dtype, how):
    inputs = make_inputs(1, 2, 40, 35, 32, dtype, mask=("bool", (1, 2, 40, 35), torch.bool), seed=3)
    blocked = [0, 5, 39]  # in the first and the last query block
    allowed = inputs["mask"]
    allowed[:, :, blocked] = False
    if how == "-inf bias":
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=DEVICE).masked_fill(~allowed, float("-inf"))
        inputs["mask"] = bias
    out, ours, _ = check_against_reference(inputs)
    assert torch.equal(out[:, :, blocked], torch.zeros_like(out[:, :, blocked]))
    assert torch.equal(ours["q"].grad[:, :, blocked], torch.zeros_like(ours["q"].grad[:, :, blocked]))
    for name in ("k", "v", "mask"):
        if name in gradients(ours):
            assert not gradients(ours)[name].isnan().any(), name


def test_saved_log_sum_exp():
    """The forward saves log2(sum exp(logits)) per row as two floats, its fp32 rounding and what
    that lost (their fp32 sum is the first: TwoSum), and (0, 0) for a row with every key masked.
    The rows lie 16 floats apart in memory (40 -> 48), so the backward can read them vectorised."""
    inputs = make_inputs(1, 2, 40, 35, 32, f32, mask=("bool", (40, 35), torch.bool), seed=4)
    inputs["mask"][7] = False
    q, k, v, mask = inputs.values()
    scale = 32**-0.5
    _, stats = attention_module.attention_forward(q, k, v, mask, None, scale, 0.0, False, False)
    assert stats.shape == (2, 1, 2, 40) and stats.dtype == torch.float32 and stats.stride() == (96, 96, 48, 1)
    assert torch.equal(stats[0] + stats[1], stats[0])  # the second part is below half an ulp of the first
    lse = stats[0].double() + stats[1].double()

    def log2_sum_exp(q, k):
        logits = (torch.einsum("bhqd, bhkd -> bhqk", q, k) * scale).masked_fill(~mask, float("-inf"))
        return (torch.logsumexp(logits, dim=-1) / math.log(2)).masked_fill(~mask.any(-1), 0.0)

    assert_close_to_reference(lse, log2_sum_exp(q.double(), k.double()), log2_sum_exp(q, k), name="lse")
    assert torch.equal(stats[:, :, :, 7], torch.zeros_like(stats[:, :, :, 7]))


@pytest.mark.parametrize("dtype", [f32, bf16])
def test_finfo_min_bias_as_in_the_reference(dtype):
    """Hugging Face masks with finfo(dtype).min rather than -inf: those keys get no weight, and a
    row of nothing else is averaged uniformly (as in the reference), in the forward and backward."""
    inputs = make_inputs(1, 2, 40, 35, 32, dtype, mask=("float", (1, 2, 40, 35), dtype), seed=5)
    lowest = torch.finfo(dtype).min
    inputs["mask"][..., ::3] = lowest
    inputs["mask"][:, :, [2, 33]] = lowest
    out, _, _ = check_against_reference(inputs)
    assert out[:, :, [2, 33]].abs().amax() > 0  # averaged, not zeroed


# Top-left aligned like SDPA; Nq < Nk and Nq > Nk; with a mask as well (both apply).
@pytest.mark.parametrize(
    "seqlen_q, seqlen_k, dtype, mask",
    [
        pytest.param(70, 70, f16, None, id="N70-f16"),
        pytest.param(197, 197, bf16, None, id="N197-bf16"),
        pytest.param(20, 75, f32, None, id="Nq20-Nk75-f32"),
        pytest.param(75, 20, f16, None, id="Nq75-Nk20-f16"),
        pytest.param(45, 37, bf16, ("float", (45, 37), f32), id="Nq45-Nk37-bias-bf16"),
        pytest.param(37, 45, f32, ("bool", (1, 2, 37, 45), torch.bool), id="Nq37-Nk45-bool-f32"),
    ],
)
def test_causal(seqlen_q, seqlen_k, dtype, mask):
    inputs = make_inputs(1, 2, seqlen_q, seqlen_k, 32, dtype, mask=mask)
    check_against_reference(inputs, is_causal=True, via_dispatch=mask is None)


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(20, 45), (45, 20)])
def test_causal_alignment_matches_torch_sdpa(seqlen_q, seqlen_k):
    """The reference is not the only judge of alignment: PyTorch's own SDPA agrees."""
    inputs = make_inputs(1, 2, seqlen_q, seqlen_k, 32, f32)
    q, k, v, _ = inputs.values()
    ours = kernels.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
    torch_sdpa64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert_close_to_reference(ours, torch_sdpa64, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_causal_skips_key_blocks_above_the_diagonal(monkeypatch):
    """Causal rows never read keys past their block: a NaN stored there must not reach the output."""
    inputs = make_inputs(1, 1, 40, 100, 32, f32)
    k, v = inputs["k"].clone(), inputs["v"].clone()
    k[:, :, 64:], v[:, :, 64:] = float("nan"), float("nan")  # beyond row 39's block for BLOCK_M <= 64
    config = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})
    monkeypatch.setattr(_attention_forward_kernel, "configs", [config])
    out = attention_triton(inputs["q"], k, v, is_causal=True)
    q, k, v, _ = inputs.values()
    expected64 = attention_reference(q.double(), k.double(), v.double(), is_causal=True)
    assert_close_to_reference(out, expected64, attention_reference(q, k, v, is_causal=True))


def check_dropout(inputs, dropout_p, **options):
    out, _, keep = check_against_reference(inputs, dropout_p=dropout_p, **options)
    assert keep.dtype == torch.bool and keep.shape == (*inputs["q"].shape[:3], inputs["k"].shape[2])
    return out, keep


@pytest.mark.parametrize(
    "dtype, dropout_p, mask, is_causal",
    [
        pytest.param(f32, 0.3, None, False, id="f32-p0.3"),
        pytest.param(f16, 0.5, ("float", (1, 2, 1, 45), f16), False, id="f16-p0.5-bias"),
        pytest.param(bf16, 0.1, ("bool", (37, 45), torch.bool), True, id="bf16-p0.1-bool-causal"),
    ],
)
def test_dropout_same_mask_as_reference(dtype, dropout_p, mask, is_causal):
    """Forward and backward against the reference given the kernel's own keep mask."""
    inputs = make_inputs(2, 2, 37, 45, 32, dtype, mask=mask)
    out, keep = check_dropout(inputs, dropout_p, is_causal=is_causal)
    # The comparison can fail: another draw of the mask is told apart.
    other = torch.rand(keep.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE) >= dropout_p
    q, k, v, bias = leaves(inputs, torch.float64).values()
    options = {"dropout_p": dropout_p, "is_causal": is_causal}
    with pytest.raises(AssertionError, match="max error"):
        assert_close_to_reference(
            out,
            attention_reference(q, k, v, bias, dropout_mask=other, **options),
            attention_reference(**low_precision_copies(inputs), dropout_mask=other, **options),
        )


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(dropout_p):
    """The kept fraction is 1 - p within 5 standard deviations, over heads, batches and rows."""
    inputs = make_inputs(2, 2, 64, 64, 16, f16)
    torch.manual_seed(0)
    _, keep = attention_triton(inputs["q"], inputs["k"], inputs["v"], dropout_p=dropout_p, return_dropout_mask=True)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - dropout_p)) < 5 * math.sqrt(dropout_p * (1 - dropout_p) / n)
    # Independent draws per (batch, head) and per row, not one pattern repeated.
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


def test_dropout_reproducible_from_torch_seed():
    inputs = make_inputs(1, 2, 37, 45, 32, f16)
    q, k, v, _ = inputs.values()

    def draw(seed):
        torch.manual_seed(seed)
        return attention_triton(q, k, v, dropout_p=0.4, return_dropout_mask=True)

    (out_a, keep_a), (out_b, keep_b), (_, keep_c) = draw(5), draw(5), draw(6)
    assert torch.equal(keep_a, keep_b) and torch.equal(out_a, out_b)
    assert not torch.equal(keep_a, keep_c)
    # The debug switch does not change what is computed, nor does the dispatch.
    torch.manual_seed(5)
    assert torch.equal(attention_triton(q, k, v, dropout_p=0.4), out_a)
    torch.manual_seed(5)
    assert torch.equal(kernels.attention(q, k, v, dropout_p=0.4, backend="triton"), out_a)


def test_dropout_through_dispatch_backward_reuses_the_forward_mask():
    """kernels.attention with dropout: forward and gradients against the mask of the same seed."""
    inputs = make_inputs(1, 2, 30, 30, 32, f32, mask=("float", (30, 30), f32))
    check_against_reference(inputs, dropout_p=0.3, via_dispatch=True)


def test_qkv_views_of_a_fused_projection():
    """q, k, v as views of (B, N, 3, H, D); the qkv gradient comes out whole."""
    batch, seqlen, heads, head_dim = 2, 37, 2, 32
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim, generator=generator, dtype=torch.float64)
    upstream = torch.randn(batch, heads, seqlen, head_dim, generator=generator, dtype=torch.float64)
    results = {}
    for dtype in (f16, torch.float64):
        for run in ("ours", "reference"):
            if run == "ours" and dtype == torch.float64:
                continue
            leaf = qkv.to(DEVICE, dtype).requires_grad_()
            q, k, v = leaf.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D)
            assert not q.is_contiguous()
            function = attention_triton if run == "ours" else attention_reference
            out = function(q, k, v)
            out.backward(upstream.to(DEVICE, dtype))
            results[run, dtype] = (out, leaf.grad)
    (out, grad), (out64, grad64), (out_low, grad_low) = (
        results["ours", f16], results["reference", torch.float64], results["reference", f16]
    )
    assert_close_to_reference(out, out64, out_low)
    assert_close_to_reference(grad, grad64, grad_low, name="grad qkv")


def test_transposed_and_sliced_views():
    """Strides that are not row-major: q stored column by column, k a slice of a wider buffer,
    v and the upstream gradient transposed views."""
    inputs = make_inputs(1, 2, 33, 40, 32, bf16)
    q, k, v, _ = inputs.values()
    wide = torch.zeros(1, 2, 40, 80, dtype=bf16, device=DEVICE)
    wide[..., 8:40] = k
    ours = {
        "q": q.transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_(),  # stride 1 along N
        "k": wide[..., 8:40].detach().requires_grad_(),  # rows 80 apart
        "v": v.transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_(),
    }
    assert ours["q"].stride(-1) != 1 and ours["k"].stride(-2) == 80 and ours["v"].stride(-2) == 1
    out = attention_triton(**ours)
    generator = torch.Generator().manual_seed(1)
    upstream = torch.randn(1, 2, 32, 33, generator=generator, dtype=torch.float64).to(DEVICE, bf16).transpose(-1, -2)
    out.backward(upstream)
    exact, low = leaves(inputs, torch.float64), leaves(inputs)
    out64 = attention_reference(exact["q"], exact["k"], exact["v"])
    out_low = attention_reference(low["q"], low["k"], low["v"])
    out64.backward(upstream.double())
    out_low.backward(upstream)
    assert_close_to_reference(out, out64, out_low)
    for name in ("q", "k", "v"):
        assert_close_to_reference(ours[name].grad, exact[name].grad, low[name].grad, name=f"grad {name}")


def test_broadcast_upstream_gradient():
    """out.sum().backward() hands the backward an upstream gradient of stride 0 everywhere."""
    inputs = make_inputs(1, 2, 30, 20, 32, f16, mask=("float", (30, 20), f32))
    ours, exact, low = leaves(inputs), leaves(inputs, torch.float64), low_precision_copies(inputs)
    attention_triton(**ours).sum().backward()
    attention_reference(**exact).sum().backward()
    attention_reference(**low).sum().backward()
    for name in ("q", "k", "v", "mask"):
        assert_close_to_reference(ours[name].grad, exact[name].grad, low[name].grad.to(ours[name].grad.dtype), name=name)


@pytest.mark.parametrize("head_dim, head_dim_v", [(8, 8), (12, 12), (257, 257), (300, 300), (64, 300), (64, 8)])
def test_unsupported_head_dims_raise(head_dim, head_dim_v):
    inputs = make_inputs(1, 1, 4, 4, head_dim, f16, head_dim_v=head_dim_v)
    for run in (attention_triton, lambda q, k, v, mask: kernels.attention(q, k, v, mask, backend="triton")):
        with pytest.raises(ValueError, match=rf"outside the Triton kernels. range, {MIN_HEAD_DIM} to {MAX_HEAD_DIM}; use backend=.einsum.") as error:
            run(**inputs)
        assert "\n" not in str(error.value)


def test_launches_take_views_as_they_are_and_one_grid_axis(monkeypatch):
    """B * H = 70,000 (over CUDA's 65,535 for grid axes 1 and 2): each of the four launches of a
    forward and backward asks for one grid axis, and q, k, v reach the kernels as the views of the
    fused qkv tensor they are, not copies. The launches are recorded, not run."""
    grids, launches = [], []

    class RecordLaunch:  # stands in for wrap_triton(kernel)[grid](*args)
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                grids.append(grid({"BLOCK_M": 16, "BLOCK_N": 16}) if callable(grid) else grid)
                launches.append(args)

            return launch

    monkeypatch.setattr(torch.library, "wrap_triton", RecordLaunch)
    qkv = torch.zeros(70_000, 1, 3, 1, 16, device=DEVICE, requires_grad=True)  # (B, N, 3, H, D)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D)
    out = attention_triton(q, k, v)
    out.backward(torch.zeros_like(out))
    assert grids == [(70_000,)] * 4
    for arg, view in zip(launches[0][:3], (q, k, v)):
        assert arg.data_ptr() == view.data_ptr() and arg.stride() == view.stride()


def test_grid_puts_batch_times_heads_on_axis_0():
    """CUDA caps grid axes 1 and 2 at 65,535 and axis 0 at 2**31 - 1: B * H = 100,000 fits."""
    grid = attention_grid(197, 100_000, 32)
    assert grid == (7 * 100_000,)
    assert grid[0] < 2**31
    # Every kernel launch goes through it: one axis, row blocks times (batch, head) pairs.
    assert attention_grid(1, 65_536 + 1, 64) == (65_537,)


def test_fp32_dots_follow_torch_tf32_switch(monkeypatch):
    q = torch.zeros(1, 1, 4, 16, device=DEVICE)
    for allow_tf32, exact in ((False, True), (True, False)):
        assert attention_module._kernel_constants(q, q, 0.0, allow_tf32)["EXACT_FP32_DOTS"] is exact
    assert attention_module._kernel_constants(q.half(), q.half(), 0.0, False)["EXACT_FP32_DOTS"] is False
    if ON_GPU:  # TF32 keeps 10 mantissa bits: its error dwarfs exact fp32's
        inputs = make_inputs(2, 4, 197, 197, 64, f32)
        exact64 = attention_reference(*(inputs[n].double() for n in "qkv"))
        errors = {}
        for allow_tf32 in (False, True):
            monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
            errors[allow_tf32] = (attention_triton(inputs["q"], inputs["k"], inputs["v"]).double() - exact64).abs().max()
        assert errors[True] > 10 * errors[False]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rule_fails_a_wrong_kernel(dtype):
    """The tutorial's post-softmax scaling, softmax(q k^T) * scale @ v, made by our own kernel with
    scale 1 times the scale afterwards; and a kernel that ignores the bias. Both must fail the rule."""
    inputs = make_inputs(1, 2, 37, 37, 64, dtype, mask=("float", (37, 37), dtype))
    q, k, v, bias = inputs.values()
    exact = leaves(inputs, torch.float64)
    out64, out_low = attention_reference(**exact), attention_reference(**inputs)
    assert_close_to_reference(attention_triton(q, k, v, bias), out64, out_low)
    post_softmax_scaling = attention_triton(q, k, v, bias, scale=1.0) * 64**-0.5
    bias_ignored = attention_triton(q, k, v)
    for wrong in (post_softmax_scaling, bias_ignored):
        with pytest.raises(AssertionError, match="max error"):
            assert_close_to_reference(wrong, out64, out_low)


def every_config_index():
    configs = (attention_configs.FORWARD_CONFIGS, attention_configs.BACKWARD_KV_CONFIGS, attention_configs.BACKWARD_Q_CONFIGS)
    return range(max(len(c) for c in configs))


@pytest.mark.slow
@pytest.mark.parametrize("index", every_config_index())
def test_every_autotune_config_computes_the_same(index, monkeypatch):
    """Whichever config the autotuner picks on a GPU, the block sizes give the same result: each
    forward config (with a backward pair) on lengths that are no multiple of any block, causal
    with both Nq < Nk and Nq > Nk, a bias gradient and dropout."""
    kernels_and_configs = [
        (_attention_forward_kernel, attention_configs.FORWARD_CONFIGS),
        (_attention_backward_kv_kernel, attention_configs.BACKWARD_KV_CONFIGS),
        (_attention_backward_q_kernel, attention_configs.BACKWARD_Q_CONFIGS),
    ]
    for kernel, configs in kernels_and_configs:
        monkeypatch.setattr(kernel, "configs", [configs[index % len(configs)]])  # one config: no tuning
    seqlen_q, seqlen_k = (70, 150) if index % 2 else (150, 70)
    inputs = make_inputs(1, 2, seqlen_q, seqlen_k, 64, f16, mask=("float", (1, 2, 1, seqlen_k), f32), seed=index)
    check_dropout(inputs, 0.2, is_causal=True)


@pytest.mark.slow
@pytest.mark.parametrize("index", every_config_index())
def test_every_autotune_config_on_the_lean_path(index, monkeypatch):
    """The same without a mask, causal or dropout, where whole blocks run the lean body (no bounds
    checks, the scale in the exponent) and only the last, partial one the masked body: lengths that
    are no multiple of any block, and lengths of whole blocks only (no masked block at all); then
    packed sequences through the same kernels (VARLEN)."""
    from tests.attention.test_varlen_triton import check_varlen, packed_inputs

    kernels_and_configs = [
        (_attention_forward_kernel, attention_configs.FORWARD_CONFIGS),
        (_attention_backward_kv_kernel, attention_configs.BACKWARD_KV_CONFIGS),
        (_attention_backward_q_kernel, attention_configs.BACKWARD_Q_CONFIGS),
    ]
    for kernel, configs in kernels_and_configs:
        monkeypatch.setattr(kernel, "configs", [configs[index % len(configs)]])
    for seqlen_q, seqlen_k, head_dim in ((150, 70, 64), (128, 256, 72)):  # 72: the forward splits it 64 + 16
        check_against_reference(make_inputs(1, 2, seqlen_q, seqlen_k, head_dim, f16, seed=index), scale=0.3)
    lengths_q, lengths_k = [130, 0, 64, 7], [70, 5, 128, 7]
    check_varlen(lengths_q, lengths_k, packed_inputs(lengths_q, lengths_k, 2, 64, bf16, seed=index))


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [40, 72, 80, 96, 160])
@pytest.mark.parametrize("dtype", [f16, bf16])
def test_head_dim_split_in_two_pieces(head_dim, dtype):
    """Head dims the forward splits into two power-of-two pieces (``_head_dim_split``: 32 + 16,
    64 + 16, 64 + 32, 128 + 32) rather than pad: unmasked, and with a bias, causal and dropout."""
    split = attention_module._head_dim_split(head_dim, head_dim, False)
    assert split is not None and sum(split) < triton.next_power_of_2(head_dim) and sum(split) >= head_dim
    check_against_reference(make_inputs(2, 2, 37, 70, head_dim, dtype, seed=head_dim))
    inputs = make_inputs(1, 2, 70, 37, head_dim, dtype, mask=("float", (1, 2, 70, 37), f32), seed=head_dim)
    check_dropout(inputs, 0.2, is_causal=True)


def test_head_dim_split_is_only_where_it_saves_work():
    split = attention_module._head_dim_split
    assert [split(d, d, False) for d in (16, 32, 64, 112, 128, 256)] == [None] * 6
    assert split(80, 64, False) is None and split(80, 80, True) is None  # D != Dv; exact fp32 dots
    assert split(80, 80, False) == (64, 16) and split(88, 88, False) == (64, 32)


def test_custom_op_schema_and_autograd_registration():
    inputs = leaves(make_inputs(1, 2, 9, 11, 16, f32, mask=("float", (2, 1, 11), f32)))
    seed = torch.tensor([5], device=DEVICE)
    checks = ("test_schema", "test_autograd_registration") if not ON_GPU else None
    for mask, dropout_seed, dropout_p, is_causal in ((None, None, 0.0, False), (inputs["mask"], seed, 0.2, True)):
        args = (inputs["q"], inputs["k"], inputs["v"], mask, dropout_seed, 0.25, dropout_p, is_causal, False)
        if checks is None:  # on a GPU: fake tensors and AOT dispatch too
            torch.library.opcheck(attention_module.attention_forward, args)
        else:
            torch.library.opcheck(attention_module.attention_forward, args, test_utils=checks)


@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    batch=st.integers(1, 2),
    heads=st.integers(1, 2),
    seqlen_q=st.integers(1, 70),
    seqlen_k=st.integers(1, 70),
    head_dim=st.sampled_from([16, 24, 40, 64, 72]),
    head_dim_v=st.sampled_from([16, 32, 48]),
    mask_kind=st.sampled_from([None, "bool", "float"]),
    mask_dims=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    mask_rank=st.integers(1, 4),
    is_causal=st.booleans(),
    dropout_p=st.sampled_from([0.0, 0.0, 0.3]),
)
def test_property_matches_reference(
    dtype, batch, heads, seqlen_q, seqlen_k, head_dim, head_dim_v, mask_kind, mask_dims, mask_rank, is_causal, dropout_p
):
    full = (batch, heads, seqlen_q, seqlen_k)
    shape = tuple(size if keep else 1 for size, keep in zip(full, mask_dims))[4 - mask_rank :]
    mask = None if mask_kind is None else (mask_kind, shape, torch.bool if mask_kind == "bool" else dtype)
    inputs = make_inputs(batch, heads, seqlen_q, seqlen_k, head_dim, dtype, head_dim_v=head_dim_v, mask=mask)
    check_against_reference(inputs, is_causal=is_causal, dropout_p=dropout_p)


@needs_cuda_for_compile
def test_compiles_fullgraph_forward_and_backward():
    inputs = make_inputs(4, 12, 197, 197, 64, bf16, mask=("float", (12, 1, 197), f32))

    def attend(q, k, v, mask, scale=None, dropout_p=0.0, is_causal=False):
        return kernels.attention(q, k, v, mask, scale, dropout_p, is_causal=is_causal, backend="triton")

    compiled = torch.compile(attend, fullgraph=True)
    ours = leaves(inputs)
    out = compiled(**ours)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    exact = leaves(inputs, torch.float64)
    low = low_precision_copies(inputs)
    out64, out_low = attention_reference(**exact), attention_reference(**low)
    out64.backward(upstream.double())
    out_low.backward(upstream)
    assert_close_to_reference(out, out64, out_low)
    for name in ("q", "k", "v", "mask"):
        assert_close_to_reference(ours[name].grad, exact[name].grad, low[name].grad.to(ours[name].grad.dtype), name=name)
    # Causal and dropout trace too (dropout's seed is drawn inside the graph).
    q, k, v, _ = leaves(inputs).values()
    out = compiled(q, k, v, None, None, 0.2, True)
    out.sum().backward()
    assert out.isfinite().all() and q.grad.isfinite().all()


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_vit_size_bias_causal_dropout(dtype):
    inputs = make_inputs(4, 12, 197, 197, 64, dtype, mask=("float", (1, 12, 197, 197), f32))
    check_dropout(inputs, 0.1)
    check_against_reference(inputs, is_causal=True)
