"""The einsum fallback, ``kernels.reference.attention_fallback``, against the float64 oracle.

``attention_fallback`` is what ``backend="einsum"`` runs: the arithmetic of ``attention_reference``
a chunk of the score matrix at a time, logits and softmax of float16/bfloat16 in float32. In order:
- the output and every gradient (q, k, v, a float mask) against ``attention_reference`` in
  float64 with the dtype rule of tests/equivalence.py: dtypes, masks with empty rows, broadcast
  biases, causal with Nq != Nk, Nq = 1, awkward and empty shapes; one chunk and many;
- low precision: logits past float16's range, a bias of finfo.min, and no larger error than
  PyTorch's SDPA in the same dtype; bfloat16 weights meeting v in bfloat16, as in SDPA;
- a finite bias never masks a key: finfo(dtype).min on every key of a row, in every dtype, for
  the einsum and the Triton backend (the interpreter on a CPU), forward and backward;
- memory: the peak held at once, forward and backward, at N = 4096;
- dropout: repeated by ``torch.manual_seed``, its rate, and the backward using the forward's mask;
- autograd: double backward, forward mode, torch.func grad/vjp/jvp/vmap/jacfwd/hessian, batched
  gradients, torch.compile with fullgraph=True;
- teeth: the rule rejects a fallback that scales after the softmax, the dropout check one whose
  backward draws a new mask, and the memory check the unchunked oracle.
"""

from __future__ import annotations

import math
import weakref

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kernels
from kernels.reference import attention_fallback, attention_reference, fallback
from tests.equivalence import DEVICE, assert_close_to_reference, max_error

f64 = torch.float64
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SHAPE = (2, 3, 113, 203)  # B, H, Nq, Nk: lengths no block size divides
MANY_CHUNKS = 6000  # CHUNK_ELEMENTS that cuts SHAPE into chunks of 29 query rows of one head: 4 per head


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread. Nothing here depends on the thread count, and on a loaded 2-core
    machine every parallel region of these many small ops can wait a scheduler tick for its second
    thread: the file takes minutes with two threads and seconds with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["one chunk", "many chunks"])
def chunks(request, monkeypatch):
    if request.param == "many chunks":
        monkeypatch.setattr(fallback, "CHUNK_ELEMENTS", MANY_CHUNKS)
    return request.param


def qkv(batch, heads, n_queries, n_keys, dim=16, dtype=f64, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, n_queries, dim), (batch, heads, n_keys, dim), (batch, heads, n_keys, dim)]
    return [(scale * torch.randn(shape, generator=generator, dtype=f64)).to(dtype) for shape in shapes]


def make_mask(kind: str, batch, heads, n_queries, n_keys, dtype, seed=1):
    generator = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "bool, empty rows":
        mask = torch.rand(batch, 1, n_queries, n_keys, generator=generator) > 0.3
        mask[0, :, 3] = False  # query 3 of batch 0 may attend nothing, in every head
        mask[-1, :, -1] = False
        return mask
    bias_shape = {"bias (1, H, 1, Nk)": (1, heads, 1, n_keys), "bias (B, 1, Nq, Nk)": (batch, 1, n_queries, n_keys),
                  "bias (Nq, Nk)": (n_queries, n_keys), "bias, -inf rows": (batch, heads, n_queries, n_keys)}[kind]
    bias = torch.randn(bias_shape, generator=generator, dtype=f64)
    if kind == "bias, -inf rows":
        bias[1, 2, 5] = float("-inf")
    return bias.to(dtype)


MASKS = ["none", "bool, empty rows", "bias (1, H, 1, Nk)", "bias (B, 1, Nq, Nk)", "bias (Nq, Nk)", "bias, -inf rows"]


def forward_backward(attend, q, k, v, mask, grad_out, **kwargs) -> dict[str, torch.Tensor]:
    """``attend``'s output and the gradients of q, k, v (and of a float mask) for ``grad_out``, from fresh leaves."""
    inputs = {name: t.detach().requires_grad_() for name, t in (("q", q), ("k", k), ("v", v))}
    if mask is not None and mask.is_floating_point():
        mask = inputs["mask"] = mask.detach().requires_grad_()
    out = attend(inputs["q"], inputs["k"], inputs["v"], mask, **kwargs)
    grads = torch.autograd.grad(out, list(inputs.values()), grad_out.to(out.dtype))
    return {"output": out, **{f"grad {name}": grad for name, grad in zip(inputs, grads)}}


def as64(t):
    return t if t is None or not t.is_floating_point() else t.double()


def assert_matches_oracle(q, k, v, mask=None, *, fallback=attention_fallback, reference_low=attention_reference, **kwargs):
    """The fallback's output and every gradient, in q's dtype, against the oracle in float64 (the dtype rule).

    ``reference_low``: the same computation in q's dtype, whose error sets the allowance.
    """
    generator = torch.Generator().manual_seed(2)
    grad_out = torch.randn(*q.shape[:3], v.shape[-1], generator=generator, dtype=f64)
    exact = forward_backward(attention_reference, as64(q), as64(k), as64(v), as64(mask), grad_out, **kwargs)
    low = forward_backward(reference_low, q, k, v, mask, grad_out, **kwargs)
    actual = forward_backward(fallback, q, k, v, mask, grad_out, **kwargs)
    for name, expected in exact.items():
        assert actual[name].dtype == low[name].dtype, f"{name}: dtype {actual[name].dtype}, expected {low[name].dtype}"
        assert_close_to_reference(actual[name], expected, low[name], name=name)


def sdpa(q, k, v, mask=None, **kwargs):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)


# ---------------------------------------------------------------------------------------------
# The output and every gradient against the oracle.


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_oracle(dtype, mask_kind, chunks):
    q, k, v = qkv(*SHAPE, dtype=dtype)
    assert_matches_oracle(q, k, v, make_mask(mask_kind, *SHAPE, dtype))


@pytest.mark.parametrize("n_queries, n_keys", [(113, 203), (203, 113), (1, 9), (64, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, f64], ids=str)
def test_causal_matches_oracle(dtype, n_queries, n_keys, chunks):
    q, k, v = qkv(2, 3, n_queries, n_keys, dtype=dtype)
    assert_matches_oracle(q, k, v, is_causal=True)
    mask = make_mask("bool, empty rows", 2, 3, n_queries, n_keys, dtype) if n_queries > 3 else None
    assert_matches_oracle(q, k, v, mask, is_causal=True, scale=0.3)


def test_float32_bias_on_float16_inputs():
    q, k, v = qkv(*SHAPE, dtype=torch.float16)
    assert_matches_oracle(q, k, v, make_mask("bias (B, 1, Nq, Nk)", *SHAPE, torch.float32))


@pytest.mark.parametrize("budget", ["batch elements", "heads", "rows", "one row"])
@pytest.mark.parametrize("mask_kind", ["bias (1, H, 1, Nk)", "bias (B, 1, Nq, Nk)", "bool, empty rows"])
def test_every_way_of_cutting_matches_oracle(monkeypatch, budget, mask_kind):
    shape = (3, 4, 17, 23)
    _, heads, n_queries, n_keys = shape
    elements = {"batch elements": 2 * heads * n_queries * n_keys, "heads": 3 * n_queries * n_keys, "rows": 5 * n_keys, "one row": 1}
    monkeypatch.setattr(fallback, "CHUNK_ELEMENTS", elements[budget])
    batches, head_cuts, row_cuts = fallback._chunks(shape)
    cut = {"batch elements": len(batches) > 1, "heads": len(head_cuts) > 1, "rows": len(row_cuts) > 1, "one row": len(row_cuts) == n_queries}
    assert cut[budget]
    q, k, v = qkv(*shape)
    assert_matches_oracle(q, k, v, make_mask(mask_kind, *shape, f64), is_causal=True)


@pytest.mark.parametrize("shape", [(0, 3, 5, 7), (2, 0, 5, 7), (2, 3, 0, 7)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_empty_batch_heads_or_queries(shape, dtype):
    q, k, v = qkv(*shape, dtype=dtype)
    assert_matches_oracle(q, k, v, make_mask("bias (B, 1, Nq, Nk)", *shape, dtype))
    assert_matches_oracle(q, k, v, is_causal=True, dropout_p=0.5)


def test_rows_with_no_key_are_zero_with_zero_gradients(chunks):
    q, k, v = (t.requires_grad_() for t in qkv(*SHAPE))
    mask = make_mask("bool, empty rows", *SHAPE, f64)
    out = attention_fallback(q, k, v, mask)
    out.sum().backward()
    assert torch.equal(out[0, :, 3], torch.zeros_like(out[0, :, 3]))
    assert torch.equal(q.grad[0, :, 3], torch.zeros_like(q.grad[0, :, 3]))
    assert not any(t.grad.isnan().any() for t in (q, k, v))


# ---------------------------------------------------------------------------------------------
# Low precision: float32 inside.


def half_ulp(t: torch.Tensor, dtype: torch.dtype) -> float:
    """Half a unit in the last place of ``dtype`` at the largest magnitude of t: the rounding of a correct result."""
    largest = t.abs().max().item() if t.numel() else 0.0
    return 0.0 if largest == 0 else torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(largest)) / 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_logits_past_float16_range_are_exact(dtype):
    # q . k / 8 = 12800 (q . k = 102400 overflows float16): the weights are uniform.
    q = k = torch.full((1, 1, 4, 64), 40.0, dtype=dtype)
    v = torch.randn(1, 1, 4, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = forward_backward(attention_fallback, q, k, v, None, torch.ones(1, 1, 4, 64))
    assert all(t.isfinite().all() for t in out.values())
    # attention_reference overflows in float16 itself, so SDPA in the same dtype sets the allowance.
    assert_matches_oracle(q, k, v, reference_low=sdpa)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_bias_of_finfo_min_on_every_key_gives_the_mean_of_v(dtype):
    q = k = torch.full((1, 1, 4, 64), 40.0, dtype=dtype)
    v = torch.randn(1, 1, 4, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    bias = torch.full((1, 1, 1, 4), torch.finfo(torch.float16).min, dtype=dtype)  # every key; finite, so no empty row
    out = attention_fallback(q, k, v, bias)
    mean = v.double().mean(-2, keepdim=True).expand_as(out)
    assert_close_to_reference(out, mean, sdpa(q, k, v, bias))
    assert_matches_oracle(q, k, v, bias, reference_low=sdpa)


class Products(TorchDispatchMode):
    """The operand dtypes of every matrix product run under it, in order."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm):
            self.dtypes.append((args[0].dtype, args[1].dtype))
        return func(*args, **(kwargs or {}))


def test_bfloat16_weights_meet_v_in_bfloat16():
    """As in SDPA's CPU kernel: the logits and dP are float32 products (of the bfloat16 values,
    exact), the weights meet v and grad_out in bfloat16 (the fast products of a CPU with bfloat16
    units), rounded once; dq and dk stay float32 products, their error SDPA's (the test above)."""
    q, k, v = (t.requires_grad_() for t in qkv(*SHAPE, dtype=torch.bfloat16))
    f32, bf16 = torch.float32, torch.bfloat16
    with Products() as forward:
        out = attention_fallback(q, k, v)
    with Products() as backward:
        out.backward(torch.ones_like(out))
    assert forward.dtypes == [(f32, f32), (bf16, bf16)]  # q k^T, p v
    assert backward.dtypes == [(f32, f32), (bf16, bf16), (f32, f32), (f32, f32), (f32, f32)]  # q k^T, p^T dO, dO v^T, dS k, dS^T q


LOW_PRECISION_CASES = {
    "random": {},
    "sharp (x3)": {"scale": 3.0},
    "bias (1, H, 1, Nk)": {"mask": "bias (1, H, 1, Nk)"},
    "q = k = 40": {"full": 40.0},
}


@pytest.mark.parametrize("case", list(LOW_PRECISION_CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_error_is_no_larger_than_sdpa_in_the_same_dtype(dtype, case):
    """Forward and every gradient: max error <= 1.05 x SDPA's + half an ulp of the result (its own rounding)."""
    options = LOW_PRECISION_CASES[case]
    shape = (2, 3, 113, 113) if "full" not in options else (1, 1, 4, 4)
    q, k, v = qkv(*shape, dim=64, dtype=dtype, scale=options.get("scale", 1.0))
    if "full" in options:
        q = k = torch.full_like(q, options["full"])
    mask = make_mask(options["mask"], *shape, dtype) if "mask" in options else None
    grad_out = torch.randn(*q.shape[:3], 64, generator=torch.Generator().manual_seed(3), dtype=f64)
    exact = forward_backward(attention_reference, as64(q), as64(k), as64(v), as64(mask), grad_out)
    ours = forward_backward(attention_fallback, q, k, v, mask, grad_out)
    theirs = forward_backward(sdpa, q, k, v, mask, grad_out)
    for name, expected in exact.items():
        error, allowed = max_error(ours[name], expected), 1.05 * max_error(theirs[name], expected) + half_ulp(expected, dtype)
        assert error <= allowed, f"{name}: error {error:.3e} > 1.05 x SDPA's {max_error(theirs[name], expected):.3e} + half an ulp"


# ---------------------------------------------------------------------------------------------
# A finite bias never masks a key (issue 19): only a bool mask or -inf empties a row.


BACKEND_DTYPES = {"einsum": DTYPES, "triton": [torch.float16, torch.bfloat16, torch.float32]}
FINFO_CASES = [
    pytest.param(backend, dtype, bias_dtype, id=f"{backend}-{str(dtype)[6:]}-bias {str(bias_dtype)[6:]}")
    for backend, dtypes in BACKEND_DTYPES.items()
    for dtype in dtypes
    for bias_dtype in [dtype] + ([torch.float32] if dtype in (torch.float16, torch.bfloat16) else [])
]


def finfo_min_bias(shape, dtype) -> torch.Tensor:
    """A (B, H, Nq, Nk) bias: row 0 finfo(dtype).min on every key, row 1 on every other key (0 on
    the rest), row 2 -inf on every key; random rows after."""
    bias = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=f64)
    bias[..., 0, :] = torch.finfo(dtype).min
    bias[..., 1, :] = 0.0
    bias[..., 1, ::2] = torch.finfo(dtype).min
    bias[..., 2, :] = float("-inf")
    return bias.to(dtype)


@pytest.mark.parametrize("backend, dtype, bias_dtype", FINFO_CASES)
def test_a_bias_of_finfo_min_on_every_key_is_no_masked_row(backend, dtype, bias_dtype):
    """Times log2(e) a finite finfo.min overflowed to -inf in the fallback, whose row then read as
    fully masked: zeros, where the reference and SDPA average v (q k^T is lost beside finfo.min;
    error 1.2 against SDPA's 6e-8 in float32). Output and every gradient (q, k, v, the bias)
    against the float64 oracle, SDPA in the same dtype setting the allowance; a -inf row stays
    zeros."""
    shape = (2, 3, 9, 11)
    q, k, v = qkv(*shape, dtype=dtype)
    bias = finfo_min_bias(shape, bias_dtype)

    def attend(q, k, v, mask, **kwargs):
        # On DEVICE (CUDA tensors on a GPU, where backend="triton" refuses CPU ones), the output and
        # through it the gradients back on the CPU, where the references compute.
        on_device = (t.to(DEVICE) for t in (q, k, v, mask))
        return kernels.attention(*on_device, backend=backend, **kwargs).cpu()

    # SDPA takes a bias of q's dtype only; the oracle in q's dtype then sets the allowance.
    assert_matches_oracle(q, k, v, bias, fallback=attend, reference_low=sdpa if bias_dtype == dtype else attention_reference)
    out = attend(q, k, v, bias)
    assert out[:, :, 0].abs().amax() > 0  # no empty row, whatever q k^T rounds to
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_floor_keeps_a_nan_bias_nan(dtype):
    """The raise of finite biases leaves NaN NaN, as in SDPA: that query row's output and bias
    gradient are NaN, the other rows untouched (tests/attention/test_mask_values.py has the full pattern)."""
    shape = (1, 2, 5, 7)
    q, k, v = qkv(*shape, dtype=dtype)
    bias = finfo_min_bias(shape, dtype)
    bias[0, 1, 3, 4] = float("nan")
    out = forward_backward(attention_fallback, q, k, v, bias, torch.ones(*shape[:3], 16))
    nan_row = torch.zeros(shape[:3], dtype=torch.bool)
    nan_row[0, 1, 3] = True
    assert out["output"][nan_row].isnan().all() and not out["output"][~nan_row].isnan().any()
    assert out["grad mask"][nan_row].isnan().all() and not out["grad mask"][~nan_row].isnan().any()


# ---------------------------------------------------------------------------------------------
# Memory.


class PeakMemory(TorchDispatchMode):
    """The most bytes held at once by the storages the ops run under it allocate (views count once)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages = {}  # data pointer -> [bytes, tensors alive on it]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr():
                key = t.untyped_storage().data_ptr()
                if key not in self.storages:
                    self.storages[key] = [t.untyped_storage().nbytes(), 0]
                    self.live += self.storages[key][0]
                    self.peak = max(self.peak, self.live)
                self.storages[key][1] += 1
                weakref.finalize(t, self._release, key)
        return out

    def _release(self, key):
        held = self.storages[key]
        held[1] -= 1
        if held[1] == 0:
            self.live -= held[0]
            del self.storages[key]


def peak_bytes(attend, n=4096, backward=True):
    q, k, v = (t.float().requires_grad_() for t in qkv(1, 2, n, n))
    with PeakMemory() as forward:
        out = attend(q, k, v)
    if not backward:
        return forward.peak, None
    with PeakMemory() as back:
        out.backward(torch.ones_like(out))
    return forward.peak, back.peak


def test_memory_is_bounded_by_chunks_not_the_score_matrix():
    scores = 1 * 2 * 4096 * 4096 * 4  # one (B, H, Nq, Nk) float32 score matrix: 128 MiB
    forward, backward = peak_bytes(attention_fallback)
    # Held: the outputs and gradients (1 MiB each at D = 16), a few chunk buffers (2 MiB each).
    assert forward < scores / 16, f"forward held {forward / 2**20:.1f} MiB at once"
    assert backward < scores / 8, f"backward held {backward / 2**20:.1f} MiB at once"
    # The check has teeth: the unchunked oracle holds whole score matrices.
    assert peak_bytes(attention_reference, backward=False)[0] > scores


# ---------------------------------------------------------------------------------------------
# Dropout.


def test_dropout_is_repeated_by_manual_seed(chunks):
    q, k, v = qkv(*SHAPE, dtype=torch.float32)
    torch.manual_seed(7)
    first = attention_fallback(q, k, v, dropout_p=0.3)
    torch.manual_seed(7)
    again = attention_fallback(q, k, v, dropout_p=0.3)
    torch.manual_seed(8)
    other = attention_fallback(q, k, v, dropout_p=0.3)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_dropout_rate_and_rescaling(chunks):
    q, k, _ = qkv(4, 4, 64, 64, dtype=torch.float32)
    torch.manual_seed(0)
    out, keep = attention_fallback(q, k, torch.ones(4, 4, 64, 16), dropout_p=0.25, return_dropout_mask=True)
    assert keep.shape == (4, 4, 64, 64) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - 0.75) < 0.01  # 65536 draws: 4 standard deviations
    assert abs(out.mean().item() - 1.0) < 0.02  # kept weights / (1 - p), with v = 1
    _, every = attention_fallback(q, k, torch.ones(4, 4, 64, 16), return_dropout_mask=True)
    assert every.all()


def dropout_pair(p=0.4, seed=5):
    """(the fallback with dropout, the oracle given the fallback's keep mask), for forward_backward."""
    kept = []

    def fallback(q, k, v, mask, **kwargs):
        torch.manual_seed(seed)
        out, keep = attention_fallback(q, k, v, mask, dropout_p=p, return_dropout_mask=True, **kwargs)
        kept.append(keep)
        return out

    def oracle(q, k, v, mask, **kwargs):
        return attention_reference(q, k, v, mask, dropout_p=p, dropout_mask=kept[-1], **kwargs)

    return fallback, oracle


def assert_dropout_matches_oracle(q, k, v, mask=None, **kwargs):
    fallback, oracle = dropout_pair()
    grad_out = torch.randn(*q.shape[:3], v.shape[-1], generator=torch.Generator().manual_seed(2), dtype=f64)
    actual = forward_backward(fallback, q, k, v, mask, grad_out, **kwargs)
    exact = forward_backward(oracle, as64(q), as64(k), as64(v), as64(mask), grad_out, **kwargs)
    low = forward_backward(oracle, q, k, v, mask, grad_out, **kwargs)
    for name, expected in exact.items():
        assert_close_to_reference(actual[name], expected, low[name], name=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, f64], ids=str)
def test_dropout_backward_uses_the_forward_mask(dtype, chunks):
    q, k, v = qkv(*SHAPE, dtype=dtype)
    assert_dropout_matches_oracle(q, k, v, make_mask("bias (1, H, 1, Nk)", *SHAPE, dtype), is_causal=True)


def test_dropout_check_catches_a_backward_with_a_new_mask(monkeypatch):
    monkeypatch.setattr(fallback, "CHUNK_ELEMENTS", MANY_CHUNKS)
    draw = fallback._keep_mask
    calls = []

    def redrawn_in_backward(seed, index, shape, dropout_p, device):
        calls.append(index)
        forward_done = calls.count(index) > 2  # the forward and return_dropout_mask draw each chunk once
        return draw(seed + forward_done, index, shape, dropout_p, device)

    monkeypatch.setattr(fallback, "_keep_mask", redrawn_in_backward)
    q, k, v = qkv(*SHAPE)
    with pytest.raises(AssertionError, match="grad"):
        assert_dropout_matches_oracle(q, k, v)


# ---------------------------------------------------------------------------------------------
# Autograd habits, each against the oracle in float64.


SMALL = (2, 2, 5, 7)


@pytest.fixture(params=["one chunk", "rows"])
def small_chunks(request, monkeypatch):
    """For SMALL: everything in one chunk, or chunks of two query rows of one head."""
    if request.param == "rows":
        monkeypatch.setattr(fallback, "CHUNK_ELEMENTS", 2 * SMALL[3])
    return request.param


def small_inputs(shape=SMALL, dim=4):
    q, k, v = qkv(*shape, dim=dim)
    bias = make_mask("bias (1, H, 1, Nk)", *shape, f64)
    return q, k, v, bias


@pytest.mark.parametrize("variant", ["plain", "bias, causal", "bool mask"])
def test_gradcheck_gradgradcheck_forward_ad_and_batched_grads(variant, small_chunks):
    shape = (1, 2, 4, 5)
    q, k, v, bias = (t.requires_grad_() for t in small_inputs(shape, dim=3))
    mask = make_mask("bool, empty rows", *shape, f64)
    attend, inputs = {
        "plain": (lambda q, k, v: attention_fallback(q, k, v), (q, k, v)),
        "bias, causal": (lambda q, k, v, b: attention_fallback(q, k, v, b, is_causal=True), (q, k, v, bias)),
        "bool mask": (lambda q, k, v: attention_fallback(q, k, v, mask), (q, k, v)),
    }[variant]
    # check_batched_grad: the backward under vmap (torch.autograd.grad(..., is_grads_batched=True)).
    assert torch.autograd.gradcheck(attend, inputs, check_forward_ad=True, check_batched_grad=True, fast_mode=True)
    assert torch.autograd.gradgradcheck(attend, inputs, check_fwd_over_rev=True, check_batched_grad=True, fast_mode=True)


def test_double_backward_equals_the_oracles(small_chunks):
    q, k, v, bias = (t.requires_grad_() for t in small_inputs())

    def second_order(attend):
        out = attend(q, k, v, bias, is_causal=True)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, bias), create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), (q, k, v, bias))

    for actual, expected in zip(second_order(attention_fallback), second_order(attention_reference)):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)


def test_forward_mode_equals_the_oracles(small_chunks):
    q, k, v, bias = small_inputs()
    tangents = tuple(torch.randn_like(t) for t in (q, k, v, bias))
    results = []
    for attend in (attention_fallback, attention_reference):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(t, dt) for t, dt in zip((q, k, v, bias), tangents)]
            dual_tangent = fwAD.unpack_dual(attend(*duals, is_causal=True)).tangent
        out, jvp_tangent = torch.func.jvp(lambda *a, attend=attend: attend(*a, is_causal=True), (q, k, v, bias), tangents)
        results.append((out, dual_tangent, jvp_tangent))
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)


def test_torch_func_transforms_equal_the_oracles(small_chunks):
    q, k, v, bias = small_inputs()
    batched_q = torch.randn(3, *q.shape, dtype=f64)
    batched_bias = torch.randn(3, *bias.shape, dtype=f64)

    def transforms(attend):
        def loss(q, k, v, b):
            return attend(q, k, v, b, is_causal=True).square().sum()

        out, vjp = torch.func.vjp(lambda *a: attend(*a, is_causal=True), q, k, v, bias)
        return {
            "grad": torch.func.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias),
            "vjp": vjp(torch.ones_like(out)),
            "vmap over q": torch.func.vmap(lambda q: attend(q, k, v, bias))(batched_q),
            "vmap over the bias alone": torch.func.vmap(lambda b: attend(q, k, v, b))(batched_bias),
            "jacfwd": torch.func.jacfwd(lambda b: attend(q, k, v, b, is_causal=True))(bias),
            "jacrev": torch.func.jacrev(lambda v: attend(q, k, v, bias))(v),
            "hessian": torch.func.hessian(lambda q: loss(q, k, v, bias))(q),
        }

    actual, expected = transforms(attention_fallback), transforms(attention_reference)
    for name in expected:
        for a, e in zip(tree_leaves(actual[name]), tree_leaves(expected[name])):
            torch.testing.assert_close(a, e, rtol=0, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


def test_compiles_fullgraph_with_gradients(monkeypatch):
    """torch.compile traces the chunks' ops (Dynamo takes no autograd.Function with a jvp); two chunks here."""
    monkeypatch.setattr(fallback, "CHUNK_ELEMENTS", math.prod(SMALL[1:]))
    q, k, v, bias = (t.requires_grad_() for t in small_inputs())

    def attend(q, k, v, bias):
        return attention_fallback(q, k, v, bias, is_causal=True)

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    grad_out = torch.randn(*q.shape[:3], v.shape[-1], dtype=f64)
    actual = forward_backward(lambda q, k, v, b: compiled(q, k, v, b), q, k, v, bias, grad_out)
    expected = forward_backward(lambda q, k, v, b: attention_reference(q, k, v, b, is_causal=True), q, k, v, bias, grad_out)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# Teeth: the rule rejects a wrong fallback.


def fallback_scaled_after_softmax(q, k, v, mask=None, **kwargs):
    """The tutorial's bug in the fallback: the scale multiplies the weights, not the logits."""
    return attention_fallback(q, k, v, mask, scale=1.0, **kwargs) * q.shape[-1] ** -0.5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_rule_rejects_a_fallback_that_scales_after_the_softmax(dtype):
    q, k, v = qkv(*SHAPE, dtype=dtype)
    assert_matches_oracle(q, k, v)
    with pytest.raises(AssertionError, match="max error"):
        assert_matches_oracle(q, k, v, fallback=fallback_scaled_after_softmax)


@pytest.mark.parametrize("is_causal", [False, True])
def test_activation_checkpointing(is_causal):
    """Under torch.utils.checkpoint (non-reentrant), which lets the backward unpack each saved
    tensor once: the same gradients as without it (the backward reads its saved tensors once)."""
    import torch.utils.checkpoint

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 16, generator=generator, dtype=torch.float64) for _ in range(3))

    def grads(checkpointed):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]

        def run(*tensors):
            return kernels.attention(*tensors, is_causal=is_causal, backend="einsum")

        out = torch.utils.checkpoint.checkpoint(run, *leaves, use_reentrant=False) if checkpointed else run(*leaves)
        out.square().sum().backward()
        return [t.grad for t in leaves]

    for plain, checkpointed in zip(grads(False), grads(True)):
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)
