"""FP8 attention (``kernels/triton/attention_fp8.py``, ``kernels/fp8.py``): e4m3 q, k, v with (B, H)
descales, for inference.

- The interpreter's e4m3 rounding helper against ``torch.float8_e4m3fn`` on every e4m3 value, every
  tie between two, a hair either side of each, out-of-range values, infinities and NaN.
- The kernel (in the interpreter) against a float64 run of its own algorithm on the same e4m3
  inputs (the online softmax by blocks of BLOCK_N, P rounded to e4m3 per block): tight, but for a
  row or two where float32 and float64 land on opposite sides of an e4m3 tie.
- The kernel against the plain float64 attention of the same e4m3 inputs, within the bound that
  rounding P to e4m3 allows (2**-4 of each weight, 2**-10 below e4m3's normal range), and the
  einsum path (dequantised, no rounding of P) against float64 tightly.
- Masks, causal, fully masked rows, a V with contiguous keys and a row-major one, non-finite and
  out-of-range inputs (what saturation does), and every one-line error.
"""

import math

import pytest
import torch
import triton
import triton.language as tl

import kernels
from kernels.fp8 import E4M3_MAX, FP8, dequantize
from kernels.triton.attention_fp8 import _INTERPRETER_FP8_CONFIG, round_to_e4m3
from tests.equivalence import DEVICE, ON_GPU

pytestmark = pytest.mark.interpreter
LOG2E = math.log2(math.e)


# ---------------------------------------------------------------------------------------------
# The rounding helper.


@triton.jit
def _round_kernel(x_ptr, rounded_ptr, as_fp8_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    x = tl.load(x_ptr + offsets, mask=inside)
    tl.store(rounded_ptr + offsets, round_to_e4m3(x), mask=inside)
    tl.store(as_fp8_ptr + offsets, round_to_e4m3(x).to(tl.float8e4nv), mask=inside)


def every_e4m3_case() -> torch.Tensor:
    """Every finite e4m3 value, the ties between neighbours and one float32 ulp either side of each,
    values past 448, infinities, NaN and a spread of random magnitudes: float32."""
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[grid.isfinite()].unique()
    ties = (grid[1:] + grid[:-1]) / 2
    around = torch.cat([ties, ties.nextafter(torch.tensor(math.inf)), ties.nextafter(torch.tensor(-math.inf))])
    beyond = torch.tensor([448.0, 449.0, 464.0, 465.0, 480.0, 500.0, 1e6, 3e38, math.inf, math.nan])
    random = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * torch.logspace(-12, 9, 4096, base=2)
    cases = torch.cat([grid, around, beyond, random, 2.0 ** torch.arange(-12.0, 9.0)])
    return torch.cat([cases, -cases])


def test_round_to_e4m3_is_torchs_cast():
    cases = every_e4m3_case()
    rounded = torch.empty_like(cases, device=DEVICE)
    as_fp8 = torch.empty(cases.shape, dtype=FP8, device=DEVICE)
    _round_kernel[(triton.cdiv(cases.numel(), 1024),)](cases.to(DEVICE), rounded, as_fp8, cases.numel(), BLOCK=1024)
    rounded, as_fp8 = rounded.cpu(), as_fp8.cpu()
    expected = cases.to(FP8).float()
    assert torch.equal(rounded.isnan(), expected.isnan())
    finite = ~expected.isnan()
    wrong = (rounded != expected) & finite
    assert not wrong.any(), f"{int(wrong.sum())} wrong, e.g. {cases[wrong][:4].tolist()} -> {rounded[wrong][:4].tolist()}"
    assert torch.equal(as_fp8.float()[finite], expected[finite])  # then the interpreter's cast keeps them exactly
    assert (rounded[finite].abs() <= E4M3_MAX).all()


# ---------------------------------------------------------------------------------------------
# The kernel against float64.


def fp8_inputs(batch=2, heads=3, seqlen_q=75, seqlen_k=75, head_dim=64, head_dim_v=None, seed=0, transpose_v=True):
    generator = torch.Generator().manual_seed(seed)
    head_dim_v = head_dim_v or head_dim
    q = torch.randn(batch, heads, seqlen_q, head_dim, generator=generator) * 2
    k = torch.randn(batch, heads, seqlen_k, head_dim, generator=generator)
    v = torch.randn(batch, heads, seqlen_k, head_dim_v, generator=generator) * 3
    return kernels.quantize_fp8(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), transpose_v=transpose_v)


def cpu(*tensors):
    """The tensors (or None) on the CPU, where the references compute."""
    return [t if t is None else t.cpu() for t in tensors]


def logits_base2(q8, k8, q_descale, k_descale, mask, scale, is_causal):
    """float64 (B, H, Nq, Nk) logits in base 2, -inf where masked, as the kernel forms them."""
    q8, k8, q_descale, k_descale, mask = cpu(q8, k8, q_descale, k_descale, mask)
    products = dequantize(q8, q_descale, torch.float64) @ dequantize(k8, k_descale, torch.float64).transpose(-1, -2)
    logits = products * scale * LOG2E
    allowed = torch.ones_like(logits, dtype=torch.bool)
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask
    elif mask is not None:
        logits = logits + mask.double() * LOG2E
    if is_causal:
        allowed = allowed & torch.ones(logits.shape[-2:], dtype=torch.bool).tril()
    return logits.masked_fill(~allowed, -math.inf)


def emulated(q8, k8, v8, q_descale, k_descale, v_descale, mask=None, scale=None, is_causal=False, block_n=None):
    """The kernel's algorithm in float64: blocks of ``block_n`` keys, the running maximum, P rounded
    to e4m3 (torch's cast) before its product with V, the row sum of P before rounding."""
    scale = q8.shape[-1] ** -0.5 if scale is None else scale
    block_n = block_n or _INTERPRETER_FP8_CONFIG.kwargs["BLOCK_N"]
    logits = logits_base2(q8, k8, q_descale, k_descale, mask, scale, is_causal)
    v8, v_descale = cpu(v8, v_descale)
    values = v8.double()
    row_max = torch.full(logits.shape[:-1], -math.inf, dtype=torch.float64)
    row_sum = torch.zeros_like(row_max)
    acc = torch.zeros(*logits.shape[:-1], v8.shape[-1], dtype=torch.float64)
    for start in range(0, logits.shape[-1], block_n):
        block = logits[..., start:start + block_n]
        new_max = torch.maximum(row_max, block.amax(-1))
        shift = new_max.masked_fill(new_max == -math.inf, 0.0)
        rescale = torch.exp2(row_max - shift)
        probs = torch.exp2(block - shift[..., None])
        row_sum = row_sum * rescale + probs.sum(-1)
        acc = acc * rescale[..., None] + probs.float().to(FP8).double() @ values[..., start:start + block_n, :]
        row_max = new_max
    return acc * v_descale.double()[:, :, None, None] / row_sum.masked_fill(row_sum == 0, 1.0)[..., None]


def plain(q8, k8, v8, q_descale, k_descale, v_descale, mask=None, scale=None, is_causal=False):
    """(float64 attention of the dequantised inputs, the weights) with no rounding of P."""
    scale = q8.shape[-1] ** -0.5 if scale is None else scale
    logits = logits_base2(q8, k8, q_descale, k_descale, mask, scale, is_causal)
    row_max = logits.amax(-1, keepdim=True)
    probs = torch.exp2(logits - row_max.masked_fill(row_max == -math.inf, 0.0))
    weights = probs / probs.sum(-1, keepdim=True).masked_fill(probs.sum(-1, keepdim=True) == 0, 1.0)
    v8, v_descale = cpu(v8, v_descale)
    return weights @ dequantize(v8, v_descale, torch.float64), weights


def run_fp8(inputs, mask=None, is_causal=False, out_dtype=torch.float32, backend="triton", scale=None):
    """kernels.attention of FP8 ``inputs`` (on DEVICE), its output on the CPU."""
    q8, k8, v8, qd, kd, vd = inputs
    return kernels.attention(
        q8, k8, v8, None if mask is None else mask.to(DEVICE), q_descale=qd, k_descale=kd, v_descale=vd,
        out_dtype=out_dtype, backend=backend, is_causal=is_causal, scale=scale,
    ).cpu()


def assert_close_but_for_ties(out, expected, rtol, atol, max_rows_off=2, off_bound=None):
    """``out`` within rtol/atol of ``expected`` but in at most ``max_rows_off`` query rows, which stay
    within ``off_bound`` (one e4m3 step of one weight: float32 and float64 rounding a tie apart)."""
    error = (out.double() - expected).abs()
    off = error > atol + rtol * expected.abs()
    rows_off = off.any(-1)
    assert int(rows_off.sum()) <= max_rows_off, (
        f"{int(rows_off.sum())} of {rows_off.numel()} rows off, max error {error.max():.3g}"
    )
    if off_bound is not None:
        assert (error[rows_off] <= off_bound).all(), f"max error in the rows off {error[rows_off].max():.3g}"


MASKS = ["none", "causal", "bool", "bias"]


def make_mask(kind, inputs, seed=1):
    q8, k8 = inputs[0], inputs[1]
    batch, heads, seqlen_q, seqlen_k = q8.shape[0], q8.shape[1], q8.shape[2], k8.shape[2]
    generator = torch.Generator().manual_seed(seed)
    if kind == "bool":  # a key padding mask, (B, 1, 1, Nk), a whole row masked in one batch element
        mask = torch.rand(batch, 1, 1, seqlen_k, generator=generator) > 0.3
        return mask
    if kind == "bias":  # a relative position bias (1, H, Nq, Nk) in bfloat16
        return (torch.randn(1, heads, seqlen_q, seqlen_k, generator=generator)).bfloat16()
    return None


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_kernel_is_its_algorithm_in_float64(kind, out_dtype):
    inputs = fp8_inputs()
    mask = make_mask(kind, inputs)
    is_causal = kind == "causal"
    out = run_fp8(inputs, mask, is_causal, out_dtype)
    assert out.dtype == out_dtype and out.shape == (2, 3, 75, 64)
    expected = emulated(*inputs, mask=mask, is_causal=is_causal)
    v_max = dequantize(inputs[2], inputs[5]).abs().max().item()
    rtol = 2.0**-8 if out_dtype == torch.bfloat16 else 1e-5
    assert_close_but_for_ties(out, expected, rtol=rtol, atol=1e-5 * v_max, off_bound=2.0**-3 * v_max)


@pytest.mark.parametrize("kind", MASKS)
def test_kernel_within_the_bound_of_rounding_p(kind):
    """|out - attention in float64| <= (2**-4 sum_j w_j |v_j| + 2**-10 sum_j |v_j| / l) per row, where
    w are the weights; l >= 1 is the row sum relative to its maximum, so sum_j |v_j| bounds the second
    term. And the typical error is far below the bound: P's rounding errors do not all line up."""
    inputs = fp8_inputs(seqlen_q=70, seqlen_k=93, head_dim=48, head_dim_v=40, seed=3)
    mask = make_mask(kind, inputs)
    out = run_fp8(inputs, mask, kind == "causal").double()
    expected, weights = plain(*inputs, mask=mask, is_causal=kind == "causal")
    values = dequantize(inputs[2], inputs[5], torch.float64).abs()
    unnormalised = weights > 0
    bound = 2.0**-4 * (weights @ values) + 2.0**-10 * (unnormalised.double() @ values) + 1e-5 * values.max()
    error = (out - expected).abs()
    assert (error <= bound).all(), f"over the bound by {(error - bound).max():.3g}"
    assert error.mean() < 0.25 * bound.mean()


@pytest.mark.parametrize("kind", MASKS)
def test_einsum_path_is_float64_of_the_dequantised_inputs(kind):
    inputs = fp8_inputs(seed=4)
    mask = make_mask(kind, inputs)
    out = run_fp8(inputs, mask, kind == "causal", backend="einsum")
    expected, _ = plain(*inputs, mask=mask, is_causal=kind == "causal")
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_default_output_is_bfloat16_and_matches_float32_output():
    inputs = fp8_inputs(seed=5)
    q8, k8, v8, qd, kd, vd = inputs
    out = kernels.attention(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, backend="triton").cpu()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, run_fp8(inputs).bfloat16(), rtol=2.0**-8, atol=0)


def test_row_major_v_gives_the_same_output():
    """A V with contiguous keys (quantize_fp8's default) and a row-major one: the same numbers."""
    transposed = fp8_inputs(seed=6)
    row_major = fp8_inputs(seed=6, transpose_v=False)
    assert transposed[2].stride(2) == 1 and row_major[2].stride(3) == 1
    assert torch.equal(transposed[2].float().cpu(), row_major[2].float().cpu())
    torch.testing.assert_close(run_fp8(transposed), run_fp8(row_major), rtol=0, atol=0)


def test_descales_none_mean_one_and_fold_into_the_scale():
    q8, k8, v8, *_ = fp8_inputs(seed=7)
    ones = torch.ones(2, 3, device=DEVICE)
    out = kernels.attention(q8, k8, v8, out_dtype=torch.float32, backend="triton").cpu()
    expected = emulated(q8, k8, v8, ones, ones, ones)
    assert_close_but_for_ties(out, expected, rtol=1e-5, atol=1e-5 * 448)
    # Descales of 2 on q and 0.5 on k cancel in the logits; 3 on v triples the output.
    halves, twos, threes = ones * 0.5, ones * 2, ones * 3
    scaled = kernels.attention(
        q8, k8, v8, q_descale=twos, k_descale=halves, v_descale=threes, out_dtype=torch.float32, backend="triton"
    ).cpu()
    torch.testing.assert_close(scaled, out * 3, rtol=1e-6, atol=1e-6)


def test_fully_masked_rows_are_zero():
    inputs = fp8_inputs(seed=8)
    mask = torch.ones(2, 1, 75, 75, dtype=torch.bool)
    mask[0, :, 10] = False  # query row 10 of batch 0 may attend nothing
    out = run_fp8(inputs, mask)
    assert (out[0, :, 10] == 0).all()
    assert out[1].abs().sum() > 0


def test_quantize_fp8_error_is_e4m3s():
    generator = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 3, 40, 32, generator=generator) * 10 for _ in range(3))
    q8, k8, v8, qd, kd, vd = cpu(*kernels.quantize_fp8(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)))
    for real, quantised, descale in ((q, q8, qd), (k, k8, kd), (v, v8, vd)):
        assert quantised.dtype == FP8 and descale.shape == (2, 3) and descale.dtype == torch.float32
        back = dequantize(quantised, descale)
        largest = real.abs().amax(dim=(2, 3), keepdim=True)
        torch.testing.assert_close(back.abs().amax(dim=(2, 3), keepdim=True), largest, rtol=1e-6, atol=0)  # 448 exactly
        error = (back - real).abs()
        assert (error <= 2.0**-4 * real.abs() + 2.0**-10 * largest / E4M3_MAX * 64).all()


def test_saturation_and_non_finite_inputs():
    """Out of range: torch's e4m3 cast (which the kernel's interpreter helper follows) saturates to
    448, so a value of 1000 cast by hand reads as 448, wrongly but finitely: quantize_fp8 scales
    first, so nothing saturates. An infinity or NaN in a slice makes its descale inf or NaN and that
    slice's output NaN: never a finite answer from a non-finite input."""
    assert torch.tensor([1000.0, -math.inf]).to(FP8).float().tolist() == [448.0, -448.0]
    generator = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(2, 2, 20, 32, generator=generator) for _ in range(3))
    big = q.clone()
    big[0, 0, 0, 0] = 1000.0
    q8, *_ = kernels.quantize_fp8(big, k, v)
    assert q8[0, 0].float().abs().max() == E4M3_MAX and q8[0, 0].float().isfinite().all()
    for name in ("q", "k", "v"):
        for bad in (math.inf, math.nan):
            tensors = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
            tensors[name][1, 0, 3, 5] = bad
            inputs = kernels.quantize_fp8(*(tensors[name].to(DEVICE) for name in ("q", "k", "v")))
            out = run_fp8(inputs)
            assert out[1, 0].isnan().any(), (name, bad)
            assert out[0].isfinite().all() and out[1, 1].isfinite().all(), (name, bad)  # other slices untouched


def test_nan_bits_in_fp8_k_reach_the_output():
    q8, k8, v8, qd, kd, vd = fp8_inputs(seed=11)
    k8 = k8.clone()
    k8[0, 1, 7, 3] = math.nan
    out = kernels.attention(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, backend="triton").cpu()
    assert out[0, 1].isnan().all()  # every row attends key 7
    assert out[1].isfinite().all()


# ---------------------------------------------------------------------------------------------
# One-line errors.


def test_errors():
    q8, k8, v8, qd, kd, vd = fp8_inputs(batch=1, heads=2, seqlen_q=8, seqlen_k=8, head_dim=32)
    bf16 = torch.randn(1, 2, 8, 32, dtype=torch.bfloat16, device=DEVICE)

    def attention(*args, **kwargs):
        return kernels.attention(*args, **{"backend": "triton", **kwargs})

    cases = [
        (TypeError, "one dtype, got q torch.float8_e4m3fn, k torch.float8_e4m3fn, v torch.bfloat16",
         lambda: attention(q8, k8, bf16)),
        (TypeError, "float8_e4m3fn, got q in torch.float8_e5m2",
         lambda: attention(*(t.float().to(torch.float8_e5m2) for t in (q8, k8, v8)))),
        (ValueError, "q_descale of shape (B, H) = (1, 2), got (2,)", lambda: attention(q8, k8, v8, q_descale=qd[0])),
        (TypeError, "k_descale a float32 tensor", lambda: attention(q8, k8, v8, k_descale=kd.double())),
        (TypeError, "out_dtype torch.bfloat16, torch.float16 or torch.float32", lambda: attention(q8, k8, v8, out_dtype=torch.int8)),
        (ValueError, "for inference: expected dropout_p=0", lambda: attention(q8, k8, v8, dropout_p=0.1)),
        (NotImplementedError, "has no backward", lambda: attention(q8, k8, v8, v_descale=vd.requires_grad_())),
        (TypeError, "are for FP8 (torch.float8_e4m3fn) q, k, v", lambda: attention(bf16, bf16, bf16, q_descale=qd)),
        (TypeError, "FP8 is taken by kernels.attention and kernels.attention_varlen only", lambda: kernels.patch_embed(
            torch.randn(1, 3, 8, 8, device=DEVICE).to(FP8), torch.randn(4, 3, 4, 4, device=DEVICE).to(FP8))),
        (ValueError, "q_descale of shape (sequences, H) = (1, 2), got (3, 2)", lambda: kernels.attention_varlen(
            q8[0].transpose(0, 1), k8[0].transpose(0, 1), v8[0].transpose(0, 1),
            *(torch.tensor([0, 8], dtype=torch.int32, device=DEVICE),) * 2, q_descale=torch.ones(3, 2, device=DEVICE))),
        (TypeError, "expected q a float16/bfloat16/float32 tensor", lambda: kernels.quantize_fp8(q8, bf16, bf16)),
    ]
    for error, words, call in cases:
        with pytest.raises(error) as raised:
            call()
        message = str(raised.value)
        assert words in message and "\n" not in message, message


# ---------------------------------------------------------------------------------------------
# The swap's FP8 mode.


def test_fp8_mode_quantises_float_inputs():
    generator = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 3, 50, 32, generator=generator).bfloat16().to(DEVICE) for _ in range(3))
    with kernels.fp8_mode():
        out = kernels.attention(q, k, v, backend="triton").cpu()
    expected = run_fp8(kernels.quantize_fp8(q, k, v), out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with kernels.fp8_mode(), pytest.raises(NotImplementedError, match="no backward"):
        kernels.attention(q.requires_grad_(), k, v, backend="triton")


# ---------------------------------------------------------------------------------------------
# Packed sequences (kernels.attention_varlen).


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("is_causal", [False, True])
def test_varlen_is_the_dense_kernel_per_sequence(is_causal):
    """Each packed sequence (lengths 5, 70, 0, 33; per-sequence descales (n, H)) gives exactly what
    the dense kernel gives it alone, and the einsum path the float64 attention of its e4m3 values."""
    lengths = [5, 70, 0, 33]
    generator = torch.Generator().manual_seed(13)
    q, k, v = torch.randn(sum(lengths), 3, 2, 32, generator=generator).to(DEVICE).unbind(1)
    q8, k8, v8, *_ = kernels.quantize_fp8(q, k, v)
    descales = [(torch.rand(len(lengths), 2, generator=generator) * 0.02 + 0.005).to(DEVICE) for _ in range(3)]
    cu = _cu(lengths)
    out = kernels.attention_varlen(
        q8, k8, v8, cu, cu, 70, 70, q_descale=descales[0], k_descale=descales[1], v_descale=descales[2],
        out_dtype=torch.float32, is_causal=is_causal, backend="triton",
    ).cpu()
    einsum = kernels.attention_varlen(
        q8, k8, v8, cu, cu, 70, 70, q_descale=descales[0], k_descale=descales[1], v_descale=descales[2],
        out_dtype=torch.float32, is_causal=is_causal, backend="einsum",
    ).cpu()
    assert out.shape == (108, 2, 32)
    for i, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if start == end:
            continue
        alone = [t[start:end].transpose(0, 1)[None] for t in (q8, k8, v8)]
        scales = [d[i:i + 1] for d in descales]
        dense = run_fp8((*alone, *scales), is_causal=is_causal)[0].transpose(0, 1)
        torch.testing.assert_close(out[start:end], dense, rtol=0, atol=0)
        expected, _ = plain(*alone, *scales, is_causal=is_causal)
        torch.testing.assert_close(einsum[start:end].double(), expected[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_varlen_fp8_mode_and_packed_quantising():
    """Packed float inputs in fp8_mode: quantize_fp8's (1, H) per-head scales, the same as quantising by hand."""
    lengths = [40, 9]
    generator = torch.Generator().manual_seed(14)
    q, k, v = (t.bfloat16().to(DEVICE) for t in torch.randn(sum(lengths), 3, 2, 16, generator=generator).unbind(1))
    cu = _cu(lengths)
    q8, k8, v8, qd, kd, vd = kernels.quantize_fp8(q, k, v)
    assert qd.shape == (1, 2) and v8.shape == v.shape and v8.stride(2) == 1  # packed: row-major (see quantize_fp8)
    assert kernels.quantize_fp8(q, k, v, transpose_v=True)[2].stride(0) == 1  # keys contiguous when asked
    back = dequantize(v8, vd)
    assert ((back - v.float()).abs() <= 2.0**-4 * v.float().abs() + vd.max() * 2.0**-9).all().item()
    with kernels.fp8_mode():
        out = kernels.attention_varlen(q, k, v, cu, cu, 40, 40, backend="triton")
    expected = kernels.attention_varlen(
        q8, k8, v8, cu, cu, 40, 40, q_descale=qd, k_descale=kd, v_descale=vd, out_dtype=torch.bfloat16, backend="triton",
    )
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_fp8_inside_context_parallel_is_refused(monkeypatch):
    """Under context_parallel each rank holds a slice of the keys: FP8 (which does not gather them) says so."""
    from kernels import dispatch

    q8, k8, v8, *_ = fp8_inputs(batch=1, heads=1, seqlen_q=8, seqlen_k=8, head_dim=32)
    monkeypatch.setattr(dispatch, "_context_parallel_mesh", lambda: object())
    with pytest.raises(NotImplementedError, match="FP8 attention inside torch's context_parallel is not supported"):
        kernels.attention(q8, k8, v8, backend="triton")


def test_fp8_custom_ops_pass_opcheck():
    """torch.library.opcheck of both FP8 ops: autograd registration here; on a GPU the fake-tensor and
    AOT-dispatch checks too (the interpreter reads data pointers fakes lack). Not test_schema: torch's
    schema check multiplies the inputs, which float8 tensors do not implement (torch 2.14)."""
    from kernels.triton import attention_fp8

    q8, k8, v8, qd, kd, vd = fp8_inputs(batch=1, heads=2, seqlen_q=9, seqlen_k=11, head_dim=32)
    descales = torch.stack([qd, kd, vd], -1).contiguous()
    checks = ("test_autograd_registration", *(("test_faketensor", "test_aot_dispatch_dynamic") if ON_GPU else ()))
    dense = (q8, k8, v8, descales, None, 0.25, False, torch.bfloat16)
    torch.library.opcheck(attention_fp8.attention_fp8_forward, dense, test_utils=checks)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    packed = [t[0].transpose(0, 1).contiguous() for t in (q8, k8, k8)]
    varlen = (*packed, cu, torch.tensor([0, 5, 11], dtype=torch.int32, device=DEVICE), 5, 6,
              descales.expand(2, 2, 3).contiguous(), 0.25, True, torch.float16)
    torch.library.opcheck(attention_fp8.attention_fp8_varlen_forward, varlen, test_utils=checks)


@pytest.mark.parametrize("seqlen_k", [64, 65, 69, 96, 97, 127])
def test_narrow_last_block(monkeypatch, seqlen_k):
    """With blocks of 64 keys (as on a GPU; the interpreter's own config has 32) the last, partial block
    runs 32 keys wide when at most 32 keys are left (tails 1, 5, 32), whole otherwise (33, 63), none
    when N is a multiple of 64: the width each block ran (the block helper spied on), and the output
    against the float64 run of the same blocks. At a head dim padded past 64 it is never narrowed."""
    from kernels.triton import attention_fp8

    monkeypatch.setattr(attention_fp8._attention_fp8_forward_kernel, "configs",
                        [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)])
    widths = []
    block = attention_fp8._fp8_block

    def spy(*args, **kwargs):
        widths.append(int(kwargs["BLOCK_N"]))
        return block(*args, **kwargs)

    if not ON_GPU:  # only the interpreter calls a jit helper as a Python global: compiled, the check alone runs
        monkeypatch.setattr(attention_fp8, "_fp8_block", spy)
    for head_dim, narrowed in ((64, True), (80, False)):
        widths.clear()
        inputs = fp8_inputs(batch=1, heads=2, seqlen_q=40, seqlen_k=seqlen_k, head_dim=head_dim, seed=seqlen_k)
        out = run_fp8(inputs)
        tail = seqlen_k % 64
        expected_widths = [64] * (seqlen_k // 64) + ([] if not tail else [32 if narrowed and tail <= 32 else 64])
        assert ON_GPU or widths == expected_widths * 2, (head_dim, widths)  # per program: 2 heads, 1 row block
        v_max = dequantize(inputs[2], inputs[5]).abs().max().item()
        assert_close_but_for_ties(out, emulated(*inputs, block_n=64), rtol=1e-5, atol=1e-5 * v_max,
                                  off_bound=2.0**-3 * v_max)


@pytest.mark.parametrize("head_dim", [72, 80, 96, 160])
def test_split_head_dims(head_dim):
    """Head dims the kernel splits in two pieces (64 + 32 at 72-96, 128 + 32 at 160): the output
    against the float64 run of its algorithm, masked and causal."""
    from kernels.triton.attention_fp8 import _fp8_head_dim_split

    split = _fp8_head_dim_split(head_dim, head_dim)
    assert split is not None and split[1] >= 32 and head_dim <= sum(split) < triton.next_power_of_2(head_dim)
    inputs = fp8_inputs(batch=1, heads=2, seqlen_q=45, seqlen_k=70, head_dim=head_dim, seed=head_dim)
    v_max = dequantize(inputs[2], inputs[5]).abs().max().item()
    for mask, is_causal in ((None, False), (make_mask("bias", inputs), True)):
        out = run_fp8(inputs, mask, is_causal)
        assert_close_but_for_ties(out, emulated(*inputs, mask=mask, is_causal=is_causal), rtol=1e-5,
                                  atol=1e-5 * v_max, off_bound=2.0**-3 * v_max)


def test_fp8_head_dim_split_only_where_it_saves_work():
    from kernels.triton.attention_fp8 import _fp8_head_dim_split

    assert [_fp8_head_dim_split(d, d) for d in (16, 32, 40, 48, 64, 128, 256)] == [None] * 7  # 48: 32 + 32 pads anyway
    assert _fp8_head_dim_split(72, 72) == _fp8_head_dim_split(80, 80) == (64, 32) and _fp8_head_dim_split(80, 64) is None
