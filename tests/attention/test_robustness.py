"""Attention's robustness: every bad input gets a clear one-line error, every edge shape a right answer.

1. Errors at the public boundary (``kernels.attention``, ``kernels.scaled_dot_product_attention``):
   each bad input is one line naming what was expected and what came. A wrong type (not a tensor,
   not a number, an unsupported or mixed dtype) is a TypeError, a wrong shape, device or value a
   ValueError.
2. Edge shapes against the reference with the shared rule (``tests.equivalence``), the Triton
   path through ``backend="triton"`` (Triton's interpreter without a GPU): empty outputs launch
   nothing, long sequences keep memory linear in N, NaN and inf go where the reference sends them.
3. Properties (hypothesis) over shapes, dtypes, masks, strides, scales and causal for attention,
   and ``kernels.scaled_dot_product_attention`` against PyTorch's for random SDPA arguments.
4. Honest dispatch: whenever "auto" falls back to the reference it says so, once.

The same checks for the patch projection are in tests/patch_embed/test_robustness.py, for the
``vit`` modules and ``python -m vit`` in tests/vit/test_robustness.py, for ``kernels.swap`` in
tests/swap/test_swap.py; their shared helpers in tests/robustness.py.
"""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import kernels
from kernels import backend as backend_choice
from kernels.checks import MAX_HEAD_DIM, MIN_HEAD_DIM
from kernels.reference import attention_reference
from kernels.triton.attention_bwd import _attention_backward_kv_kernel
from kernels.triton.attention_bwd_dq import _attention_backward_q_kernel
from kernels.triton.attention_fwd import _attention_forward_kernel
from tests.equivalence import DEVICE, DTYPES, ON_GPU, assert_close_to_reference
from tests.robustness import examples, one_line_error, qkv, randn

f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
needs_gpu = pytest.mark.gpu(reason="too slow or too big for the interpreter")
TRITON = pytest.param("triton", marks=pytest.mark.interpreter)  # runs the kernels: the interpreter on a CPU


# ---------------------------------------------------------------------------------------------
# 1. Errors at the public boundary.

NAN, INF = float("nan"), float("inf")
# (id, changes to the arguments of kernels.attention(q, k, v) as a function of (q, k, v), error, message)
ATTENTION_ERRORS = [
    ("q-rank-3", lambda q, k, v: {"q": q[0]}, ValueError, r"expected q of shape \(B, H, N, D\), got \(2, 5, 16\)"),
    ("v-rank-5", lambda q, k, v: {"v": v[None]}, ValueError, r"expected v of shape \(B, H, N, D\), got \(1, 1, 2, 5, 16\)"),
    ("q-list", lambda q, k, v: {"q": q.tolist()}, TypeError, "expected q to be a tensor, got list"),
    ("k-numpy", lambda q, k, v: {"k": k.cpu().numpy()}, TypeError, "expected k to be a tensor, got ndarray"),
    ("mask-list", lambda q, k, v: {"mask": [[True] * 5] * 5}, TypeError, "expected the mask to be a tensor, got list"),
    ("batch", lambda q, k, v: {"k": torch.cat([k, k])}, ValueError,
     r"same batch and heads \(B, H\), got q \(1, 2, 5, 16\), k \(2, 2, 5, 16\), v \(1, 2, 5, 16\)"),
    ("heads", lambda q, k, v: {"k": k[:, :1], "v": v[:, :1]}, ValueError,
     r"same batch and heads \(B, H\), got q \(1, 2, 5, 16\), k \(1, 1, 5, 16\)"),
    ("head-dim", lambda q, k, v: {"k": k[..., :8]}, ValueError, "same head dim, got q 16 and k 8"),
    ("head-dim-0", lambda q, k, v: {"q": q[..., :0], "k": k[..., :0]}, ValueError,
     r"head dim of at least 1, got q of shape \(1, 2, 5, 0\)"),
    ("kv-length", lambda q, k, v: {"v": v[:, :, :3]}, ValueError, "same length, got k 5 and v 3"),
    ("no-keys", lambda q, k, v: {"k": k[:, :, :0], "v": v[:, :, :0]}, ValueError,
     r"at least one key, got k of shape \(1, 2, 0, 16\)"),
    ("mixed-dtypes", lambda q, k, v: {"v": v.double()}, TypeError,
     "one dtype, got q torch.float32, k torch.float32, v torch.float64"),
    ("int64", lambda q, k, v: {"q": q.long(), "k": k.long(), "v": v.long()}, TypeError,
     "expected a floating-point q, got torch.int64"),
    ("bool", lambda q, k, v: {"q": q > 0, "k": k > 0, "v": v > 0}, TypeError, "expected a floating-point q, got torch.bool"),
    ("v-on-meta", lambda q, k, v: {"v": v.to("meta")}, ValueError, r"one device, got q \S+, k \S+, v meta"),
    ("mask-on-meta", lambda q, k, v: {"mask": torch.ones(5, 5, dtype=torch.bool, device="meta")}, ValueError,
     r"one device, got q \S+, k \S+, v \S+, mask meta"),
    ("mask-int", lambda q, k, v: {"mask": torch.ones(5, 5, dtype=torch.int64, device=q.device)}, TypeError,
     r"bool mask \(True = may attend\) or a float mask, got torch.int64"),
    ("mask-float16-for-float32", lambda q, k, v: {"mask": torch.zeros(5, 5, dtype=f16, device=q.device)}, TypeError,
     r"float mask of q's dtype \(torch.float32\) or float32, got torch.float16"),
    ("mask-shape", lambda q, k, v: {"mask": torch.ones(4, 5, dtype=torch.bool, device=q.device)}, ValueError,
     r"mask broadcastable to \(B, H, Nq, Nk\) = \(1, 2, 5, 5\), got \(4, 5\)"),
    ("mask-rank-5", lambda q, k, v: {"mask": torch.ones(1, 1, 1, 5, 5, dtype=torch.bool, device=q.device)}, ValueError,
     r"mask broadcastable to \(B, H, Nq, Nk\) = \(1, 2, 5, 5\), got \(1, 1, 1, 5, 5\)"),
    ("scale-nan", lambda q, k, v: {"scale": NAN}, ValueError, "scale to be None or a finite number, got nan"),
    ("scale-inf", lambda q, k, v: {"scale": -INF}, ValueError, "scale to be None or a finite number, got -inf"),
    ("scale-str", lambda q, k, v: {"scale": "0.5"}, TypeError, "scale to be None or a finite number, got str"),
    ("scale-tensor", lambda q, k, v: {"scale": torch.tensor(0.5)}, TypeError, "scale to be None or a finite number, got torch.Tensor"),
    ("scale-bool", lambda q, k, v: {"scale": True}, TypeError, "scale to be None or a finite number, got bool"),
    ("dropout-1", lambda q, k, v: {"dropout_p": 1.0}, ValueError, r"expected 0 <= dropout_p < 1, got 1.0"),
    ("dropout-nan", lambda q, k, v: {"dropout_p": NAN}, ValueError, r"expected 0 <= dropout_p < 1, got nan"),
    ("dropout-str", lambda q, k, v: {"dropout_p": "0.1"}, TypeError, r"dropout_p to be a number in \[0, 1\), got str"),
    ("is_causal-str", lambda q, k, v: {"is_causal": "yes"}, TypeError, r"is_causal to be a bool \(True or False\), got str"),
]


@pytest.mark.parametrize("backend", ["einsum", "triton"])
@pytest.mark.parametrize("change, error, message", [pytest.param(*case[1:], id=case[0]) for case in ATTENTION_ERRORS])
def test_attention_bad_input_is_a_one_line_error(change, error, message, backend):
    q, k, v = qkv()
    arguments = {"q": q, "k": k, "v": v, **change(q, k, v)}
    one_line_error(error, "^attention: .*" + message, kernels.attention, **arguments, backend=backend)


@pytest.mark.parametrize("scale", [-0.7, 0.0, 2.5, 1, np.float32(0.3), np.float64(1e-3)])
def test_attention_takes_any_finite_scale_as_sdpa_does(scale):
    q, k, v = qkv(dtype=f64, n_keys=7)
    expected = F.scaled_dot_product_attention(q, k, v, scale=float(scale))
    torch.testing.assert_close(kernels.attention(q, k, v, scale=scale, backend="einsum"), expected, rtol=0, atol=1e-12)


def test_triton_refuses_float64_through_every_public_function():
    q, k, v = qkv(dtype=f64)
    expected = "the Triton kernels take float16, bfloat16 or float32, got torch.float64; use backend='einsum'"
    one_line_error(TypeError, "^attention: " + expected, kernels.attention, q, k, v, backend="triton")
    one_line_error(TypeError, expected, kernels.scaled_dot_product_attention, q, k, v, backend="triton")
    images, weight = randn(1, 3, 16, 16, dtype=f64), randn(8, 3, 8, 8, dtype=f64)
    one_line_error(TypeError, "^patch_embed: " + expected, kernels.patch_embed, images, weight, backend="triton")


@pytest.mark.parametrize("head_dim", [8, 300])
@pytest.mark.parametrize("shape", [(2, 2, 5), (0, 2, 5), (2, 2, 0)], ids=["B2", "B0", "Nq0"])
def test_triton_head_dim_error_does_not_depend_on_the_batch(head_dim, shape):
    """An empty batch launches nothing, but an input the kernel cannot take is refused all the same:
    an error that only appeared once the batch filled up would surface late."""
    batch, heads, n_queries = shape
    q, k, v = qkv(batch, heads, n_queries, 5, head_dim)
    one_line_error(
        ValueError, f"head dim {head_dim} is outside the Triton kernels' range, {MIN_HEAD_DIM} to {MAX_HEAD_DIM}",
        kernels.attention, q, k, v, backend="triton",
    )
    assert kernels.attention(q, k, v, backend="einsum").shape == (batch, heads, n_queries, head_dim)


SDPA_ERRORS = [
    ("query-list", lambda q, k, v: {"query": [1.0]}, TypeError, "expected query to be a tensor, got list"),
    ("key-rank-1", lambda q, k, v: {"key": k[0, 0]}, ValueError, r"expected key of shape \(\.\.\., L, E\), got \(16,\)"),
    ("mask-list", lambda q, k, v: {"attn_mask": [[True]]}, TypeError, "expected attn_mask to be a tensor, got list"),
    ("ranks", lambda q, k, v: {"key": k[None]}, ValueError, "one rank, got 3, 4 and 3"),
    ("leading-dims", lambda q, k, v: {"key": torch.cat([k, k])}, ValueError,
     r"same leading dims, got \(2, 5, 16\), \(4, 5, 16\) and \(2, 5, 16\)"),
    ("gqa-not-divisible", lambda q, k, v: {"query": torch.cat([q, q[:1]])[None], "key": k[None], "value": v[None],
                                           "enable_gqa": True}, ValueError,
     "enable_gqa expects query heads divisible by key heads and by value heads, got 3, 2 and 2"),
    ("gqa-no-key-heads", lambda q, k, v: {"query": q[None], "key": k[None, :0], "value": v[None, :0], "enable_gqa": True},
     ValueError, "enable_gqa expects query heads divisible by key heads and by value heads, got 2, 0 and 0"),
    ("mask-shape", lambda q, k, v: {"attn_mask": torch.ones(3, 5, 5, dtype=torch.bool, device=q.device)}, ValueError,
     r"attn_mask broadcastable to \(2, 5, 5\), got \(3, 5, 5\)"),
    ("mask-rank", lambda q, k, v: {"attn_mask": torch.ones(1, 1, 5, 5, dtype=torch.bool, device=q.device)}, ValueError,
     r"attn_mask broadcastable to \(2, 5, 5\), got \(1, 1, 5, 5\)"),
    ("mask-and-causal", lambda q, k, v: {"attn_mask": torch.ones(5, 5, dtype=torch.bool, device=q.device),
                                         "is_causal": True}, ValueError, "either attn_mask or is_causal=True, got both"),
    ("scale-nan", lambda q, k, v: {"scale": NAN}, ValueError, "scale to be None or a finite number, got nan"),
]


@pytest.mark.parametrize("change, error, message", [pytest.param(*case[1:], id=case[0]) for case in SDPA_ERRORS])
def test_sdpa_bad_input_is_a_one_line_error(change, error, message):
    q, k, v = (t[0] for t in qkv())  # (2, 5, 16): heads as the batch
    arguments = {"query": q, "key": k, "value": v, **change(q, k, v)}
    one_line_error(error, message, kernels.scaled_dot_product_attention, **arguments, backend="einsum")


# ---------------------------------------------------------------------------------------------
# 2. Edge shapes, against the reference with the shared rule.


def check_attention(buffers: dict, views: dict | None = None, *, seed=1, **options):
    """``kernels.attention(backend="triton")`` against the reference in float64 and in the inputs'
    dtype: the output, then the gradient of every float buffer for one upstream gradient.

    ``buffers`` holds contiguous leaf tensors q, k, v and optionally mask; ``views`` maps a name to
    a function making the tensor the op receives from its buffer (a transposed or sliced view, say),
    so the kernel sees those strides and the gradient is compared on the buffer. Returns
    (output, our buffers with their .grad).
    """
    views = views or {}
    dtype = buffers["q"].dtype

    def run(function, cast):
        leaves = {}
        for name, buffer in buffers.items():
            if buffer is None or buffer.dtype == torch.bool:
                leaves[name] = buffer
            else:
                leaves[name] = buffer.detach().to(cast(name, buffer)).clone().requires_grad_()
        arguments = {name: views.get(name, lambda t: t)(t) if t is not None else None for name, t in leaves.items()}
        return function(**arguments, **options), leaves

    def triton_attention(**arguments):
        return kernels.attention(**arguments, backend="triton")

    out, ours = run(triton_attention, lambda name, t: t.dtype)
    out64, exact = run(attention_reference, lambda name, t: f64)
    # A float32 bias beside low-precision q goes to q's dtype: the rule wants PyTorch's error in q's dtype.
    out_low, low = run(attention_reference, lambda name, t: dtype)
    assert out.dtype == dtype and out.shape == out64.shape
    upstream = randn(*out.shape, dtype=f64, seed=seed)
    for output in (out, out64, out_low):
        output.backward(upstream.to(output.dtype))
    assert_close_to_reference(out, out64, out_low.to(dtype), name="output")
    for name, leaf in ours.items():
        if leaf is not None and leaf.requires_grad:
            assert_close_to_reference(leaf.grad, exact[name].grad, low[name].grad.to(leaf.dtype), name=f"grad {name}")
    return out, ours


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_query_one_key(dtype):
    q, k, v = qkv(2, 2, 1, 1, 16, dtype=dtype)
    check_attention({"q": q, "k": k, "v": v})
    check_attention({"q": q, "k": k, "v": v}, is_causal=True, scale=-0.5)
    for allowed in (True, False):  # one key, attended or masked: v itself, or the zero row
        out, _ = check_attention({"q": q, "k": k, "v": v, "mask": torch.tensor(allowed, device=DEVICE)})
        assert torch.equal(out, v if allowed else torch.zeros_like(v))


@pytest.mark.parametrize(
    "shape", [(0, 2, 5, 7), (2, 0, 5, 7), (2, 2, 0, 7), (0, 0, 0, 7)], ids=["B0", "H0", "Nq0", "all-empty"]
)
@pytest.mark.parametrize("options", [{}, {"dropout_p": 0.3, "is_causal": True}], ids=["plain", "dropout-causal"])
def test_empty_output_launches_nothing(no_launches, shape, options):
    batch, heads, n_queries, n_keys = shape
    q, k, v = (t.requires_grad_() for t in qkv(batch, heads, n_queries, n_keys, 16, dim_v=24))
    mask = torch.ones(n_queries, n_keys, dtype=torch.bool, device=DEVICE)
    for run in (
        lambda: kernels.attention(q, k, v, mask, backend="triton", **options),
        lambda: kernels.scaled_dot_product_attention(q, k, v, attn_mask=None, backend="triton", **options),
    ):
        out = run()
        assert out.shape == (batch, heads, n_queries, 24) and out.dtype == f32
        out.sum().backward()
        for t in (q, k, v):
            assert t.grad.shape == t.shape and not t.grad.any()
            t.grad = None


def test_sdpa_rank_3_with_no_queries():
    """(B, L, E) with L = 0: brought to (B, 1, L, E) by the leading dims' product (a reshape to -1
    cannot tell how many rows an empty tensor has)."""
    q, k, v = (t[0] for t in qkv(1, 3, 0, 4, 16, dim_v=24))
    for backend in ("einsum", "triton"):
        out = kernels.scaled_dot_product_attention(q, k, v, backend=backend)
        assert out.shape == (3, 0, 24)
    assert F.scaled_dot_product_attention(q, k, v).shape == (3, 0, 24)


def long_sequence_configs(monkeypatch, block: int):
    """One config of ``block`` x ``block`` tiles for each attention kernel: fewer, bigger tiles are
    what makes a long sequence affordable in the interpreter, which pays per program and per step."""
    config = triton.Config({"BLOCK_M": block, "BLOCK_N": block}, num_warps=4, num_stages=1)
    for kernel in (_attention_forward_kernel, _attention_backward_kv_kernel, _attention_backward_q_kernel):
        monkeypatch.setattr(kernel, "configs", [config])


def largest_allocation(function) -> int:
    """The most bytes any one op allocated on the CPU while ``function`` ran (the profiler's count)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profile:
        function()
    return max((event.cpu_memory_usage for event in profile.events()), default=0)


@pytest.mark.interpreter
@pytest.mark.skipif(ON_GPU, reason="the GPU test below measures CUDA memory at N = 16,384")
def test_long_sequence_memory_is_linear_in_n(monkeypatch):
    """N = 4,096 (B = H = 1, D = 16) through the Triton path: the forward saves O(N) tensors for
    the backward and allocates nothing of N * N bytes, where the plain einsum reference allocates
    its (N, N) logits (so the probe does see such an allocation). Rows of the output checked
    against the reference (rows are independent without a mask)."""
    n = 4096
    long_sequence_configs(monkeypatch, 512)
    q, k, v = (t.requires_grad_() for t in qkv(1, 1, n, n, 16, device="cpu"))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        outputs = []
        peak = largest_allocation(lambda: outputs.append(kernels.attention(q, k, v, backend="triton")))
    out = outputs[0]
    assert saved and max(saved) <= 2 * n * 16, saved  # q, k, v, out, the (2, B, H, N) statistics
    assert peak < n * n, f"an allocation of {peak} bytes: (N, N) is {n * n} elements"
    assert largest_allocation(lambda: attention_reference(q, k, v)) >= 4 * n * n
    rows = torch.arange(0, n, 97)
    with torch.no_grad():
        q_rows, k64, v64 = q.detach()[:, :, rows], k.detach().double(), v.detach().double()
        assert_close_to_reference(
            out.detach()[:, :, rows], attention_reference(q_rows.double(), k64, v64),
            attention_reference(q_rows, k.detach(), v.detach()),
        )


@pytest.mark.interpreter
@pytest.mark.skipif(ON_GPU, reason="the GPU test below runs the backward at N = 16,384")
def test_long_sequence_backward_allocates_nothing_quadratic(monkeypatch):
    """The backward at N = 2,048: gradients against the reference, no allocation of N * N bytes."""
    n = 2048
    long_sequence_configs(monkeypatch, 512)
    inputs = dict(zip("qkv", qkv(1, 1, n, n, 16, device="cpu")))
    ours = {name: t.clone().requires_grad_() for name, t in inputs.items()}
    out = kernels.attention(**ours, backend="triton")
    upstream = randn(*out.shape, seed=1, device="cpu")
    peak = largest_allocation(lambda: out.backward(upstream))
    assert peak < n * n, f"the backward allocated {peak} bytes at once: (N, N) is {n * n} elements"
    exact = {name: t.double().requires_grad_() for name, t in inputs.items()}
    low = {name: t.clone().requires_grad_() for name, t in inputs.items()}
    attention_reference(**exact).backward(upstream.double())
    attention_reference(**low).backward(upstream)
    for name in "qkv":
        assert_close_to_reference(ours[name].grad, exact[name].grad, low[name].grad, name=f"grad {name}")


@pytest.mark.interpreter
@needs_gpu
def test_long_sequence_on_gpu_memory_is_linear_in_n():
    """N = 16,384, B = H = 1, D = 64: forward and backward peak far below one (N, N) matrix of bytes
    (268 MB; the float16 logits alone would be 512 MB), output rows against the reference."""
    n = 16_384
    q, k, v = (t.requires_grad_() for t in qkv(1, 1, n, n, 64, dtype=f16))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = kernels.attention(q, k, v, backend="triton")
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert peak < n * n, f"peak {peak} bytes"
    assert q.grad.isfinite().all() and k.grad.isfinite().all() and v.grad.isfinite().all()
    rows = torch.arange(0, n, 61, device=DEVICE)
    with torch.no_grad():
        q_rows = q.detach()[:, :, rows]
        assert_close_to_reference(
            out.detach()[:, :, rows],
            attention_reference(q_rows.double(), k.detach().double(), v.detach().double()),
            attention_reference(q_rows, k.detach(), v.detach()),
        )


@pytest.mark.interpreter
@needs_gpu
@pytest.mark.parametrize("n", [1, 16])
def test_batch_times_heads_over_65535_launches_for_real(n):
    """B * H = 65,552 > 65,535 (CUDA's limit on grid axes 1 and 2): a real launch, forward and backward."""
    q, k, v = qkv(4097, 16, n, n, 16, dtype=f16)
    check_attention({"q": q, "k": k, "v": v}, is_causal=n > 1)


@pytest.mark.interpreter
@pytest.mark.parametrize("how", ["bool", "-inf bias"])
def test_rows_with_no_key_and_rows_with_every_key(how):
    """Rows 0, 3, 6, ... may attend nothing (zeros, as PyTorch's SDPA), rows 1, 4, ... everything,
    the rest a random set; in the first and the last query block."""
    q, k, v = qkv(1, 2, 70, 35, 32, dtype=bf16, seed=4)
    allowed = torch.rand(1, 2, 70, 35, generator=torch.Generator().manual_seed(5)) < 0.5
    allowed[:, :, 0::3], allowed[:, :, 1::3] = False, True
    allowed = allowed.to(DEVICE)
    mask = allowed if how == "bool" else torch.zeros(allowed.shape, device=DEVICE).masked_fill(~allowed, -INF)
    out, _ = check_attention({"q": q, "k": k, "v": v, "mask": mask})
    assert torch.equal(out[:, :, 0::3], torch.zeros_like(out[:, :, 0::3]))
    sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=allowed)
    assert torch.equal(sdpa[:, :, 0::3], torch.zeros_like(sdpa[:, :, 0::3]))


@pytest.mark.interpreter
def test_bf16_results_round_to_nearest_as_on_a_gpu():
    """Exact sums, then one rounding to bf16: the kernel must round to nearest even, as a GPU does.
    The interpreter's own fp32 -> bf16 cast truncates; before the kernels rounded explicitly there,
    outputs and gradients came out up to one bf16 ulp low (half of this test's values)."""
    generator = torch.Generator().manual_seed(0)

    def sixty_fourths(*shape):  # multiples of 1/64 up to 16: sums of them are exact in fp32
        return (torch.randint(-2**10, 2**10, shape, generator=generator).float() / 64).to(DEVICE, bf16)

    q = torch.zeros(1, 2, 40, 32, dtype=bf16, device=DEVICE, requires_grad=True)
    k = torch.zeros(1, 2, 2, 32, dtype=bf16, device=DEVICE, requires_grad=True)
    v = sixty_fourths(1, 2, 2, 32).requires_grad_()
    out = kernels.attention(q, k, v, backend="triton")  # equal logits: each row is (v0 + v1) / 2
    expected = ((v[:, :, 0].float() + v[:, :, 1].float()) / 2).to(bf16)
    assert torch.equal(out, expected[:, :, None].expand_as(out))
    upstream = sixty_fourths(*out.shape)
    out.backward(upstream)
    expected_grad_v = (upstream.float().sum(2) / 2).to(bf16)  # each key gets half of every row's gradient
    assert torch.equal(v.grad, expected_grad_v[:, :, None].expand_as(v.grad))


def nan_and_inf(t: torch.Tensor):
    return t.isnan(), t.isinf()


def quiet_numpy_nan(test):
    """The interpreter computes in numpy, which warns at each NaN it makes; here NaN is the point."""
    test = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")(test)
    return pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")(test)


@pytest.mark.interpreter
@quiet_numpy_nan
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_query_row_stays_in_its_row(dtype, bad):
    """NaN or inf in row i of q: NaN in row i of the output only, as in the reference; the other
    rows as the reference computes them."""
    q, k, v = qkv(2, 2, 70, 40, 16, dtype=dtype, seed=6)
    q[1, 0, 66, 3] = bad
    out = kernels.attention(q, k, v, backend="triton")
    out64 = attention_reference(q.double(), k.double(), v.double())
    assert out[1, 0, 66].isnan().all() and out64[1, 0, 66].isnan().all()
    rows = torch.ones(out.shape[:3], dtype=torch.bool, device=DEVICE)
    rows[1, 0, 66] = False
    assert out[rows].isfinite().all()
    assert_close_to_reference(out[rows], out64[rows], attention_reference(q, k, v)[rows])


@pytest.mark.interpreter
@quiet_numpy_nan
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("bad", [NAN, INF])
def test_non_finite_key_or_value_goes_where_the_reference_sends_it(where, bad):
    """A non-finite k of key j reaches only the rows that attend key j (a masked logit is -inf
    whatever it was, as the reference's masked_fill; PyTorch's SDPA adds the mask as a -inf bias,
    NaN + -inf = NaN, and so spreads it to every row). A non-finite v of key j reaches every row
    whose block reads key j, attended or not, element by element: its weight 0 times inf is NaN,
    in the reference and PyTorch's SDPA alike. The kernel matches exactly where NaN and inf fall."""
    q, k, v = qkv(1, 1, 40, 20, 16, seed=7)
    {"k": k, "v": v}[where][0, 0, 7, 5] = bad
    allowed = torch.ones(40, 20, dtype=torch.bool, device=DEVICE)
    allowed[:, 7] = False
    allowed[[3, 30], 7] = True  # only rows 3 and 30 attend key 7
    out = kernels.attention(q, k, v, allowed, backend="triton")
    out64 = attention_reference(q.double(), k.double(), v.double(), allowed)
    sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=allowed)
    for expected in (out64, sdpa) if where == "v" else (out64,):
        for ours, theirs in zip(nan_and_inf(out), nan_and_inf(expected)):
            assert torch.equal(ours, theirs)
    if where == "k":  # NaN: rows 3 and 30; inf: a logit of +inf (NaN) or -inf (weight 0), by q's sign there
        bad_rows = out.isnan().any(-1)[0, 0].nonzero().flatten().tolist()
        assert set(bad_rows) <= {3, 30} and (bad_rows == [3, 30] or not math.isnan(bad))
    finite = out64.isfinite()
    assert_close_to_reference(out[finite], out64[finite], attention_reference(q, k, v, allowed)[finite])


@pytest.mark.interpreter
@quiet_numpy_nan
def test_causal_never_reads_key_blocks_above_the_diagonal_so_poisons_less():
    """Causal: the kernel skips key blocks wholly above a row block's diagonal, so a NaN in v there
    reaches fewer rows than in the reference (which multiplies every masked weight 0 by it): the
    kernel's NaN is a subset of the reference's, and its finite rows are the clean reference's."""
    n = 300  # more than one row block for every block size the autotuner may pick on a GPU
    q, k, v = qkv(1, 1, n, n, 16, seed=8)
    v_bad = v.clone()
    v_bad[0, 0, n - 1] = NAN
    out = kernels.attention(q, k, v_bad, backend="triton", is_causal=True)
    out64 = attention_reference(q.double(), k.double(), v_bad.double(), is_causal=True)
    assert out64.isnan().all()  # 0 * NaN in every row
    assert out[0, 0, n - 1].isnan().all() and not (out.isnan() & ~out64.isnan()).any()
    finite = out.isfinite().all(-1)
    clean64 = attention_reference(q.double(), k.double(), v.double(), is_causal=True)
    assert finite.any()
    assert_close_to_reference(out[finite], clean64[finite], attention_reference(q, k, v, is_causal=True)[finite])


@pytest.mark.interpreter
@examples(6)
@given(
    dtype=st.sampled_from(DTYPES),
    magnitude=st.sampled_from([1.0, 10.0, 100.0]),
    seqlen_q=st.integers(1, 70),
    seqlen_k=st.integers(1, 40),
    mask_kind=st.sampled_from([None, "bool", "finfo.min bias"]),
    is_causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_finite_inputs_never_give_nan(dtype, magnitude, seqlen_q, seqlen_k, mask_kind, is_causal, seed):
    """Finite q, k, v whose logits fit float32 (huge ones included: q and k scaled up, v O(1) so the
    true gradients fit float16), any mask, fully masked rows: a finite output and finite gradients."""
    q, k, v = qkv(1, 2, seqlen_q, seqlen_k, 16, dtype=dtype, seed=seed)
    q, k, v = (q * magnitude).requires_grad_(), (k * magnitude).requires_grad_(), v.requires_grad_()
    mask = None
    if mask_kind is not None:
        allowed = torch.rand(seqlen_q, seqlen_k, generator=torch.Generator().manual_seed(seed)) < 0.6
        allowed[::4] = False
        mask = allowed.to(DEVICE)
        if mask_kind == "finfo.min bias":
            mask = torch.zeros(allowed.shape, dtype=dtype, device=DEVICE).masked_fill(~mask, torch.finfo(dtype).min)
    out = kernels.attention(q, k, v, mask, is_causal=is_causal, backend="triton")
    out.backward(torch.ones_like(out))
    assert out.isfinite().all()
    assert q.grad.isfinite().all() and k.grad.isfinite().all() and v.grad.isfinite().all()


# ---------------------------------------------------------------------------------------------
# 3. Properties.

# How a (B, H, N, D) tensor is laid out in memory: (buffer from the tensor, view of the buffer).
LAYOUTS = {
    "contiguous": (lambda t: t, lambda b: b),
    "transposed": (lambda t: t.transpose(-1, -2).contiguous(), lambda b: b.transpose(-1, -2)),  # stride 1 along N
    "sliced": (lambda t: F.pad(t, (3, 5)), lambda b: b[..., 3:-5]),  # rows wider than D, an offset
    "heads-inner": (lambda t: t.transpose(1, 2).contiguous(), lambda b: b.transpose(1, 2)),  # a qkv projection's
    "batch-broadcast": (lambda t: t[:1].contiguous(), None),  # stride 0 over the batch: one buffer for every image
}


def laid_out(t: torch.Tensor, layout: str):
    to_buffer, view = LAYOUTS[layout]
    if layout == "batch-broadcast":
        batch = t.shape[0]

        def view(b):
            return b.expand(batch, *b.shape[1:])

    return to_buffer(t), view


def random_mask(kind, shape, dtype, rows_mode, generator):
    """A bool mask (True = may attend) or a float bias, some query rows all masked or all open."""
    allowed = torch.rand(shape, generator=generator) < 0.7
    if rows_mode and len(shape) >= 2 and shape[-2] > 1:
        modes = torch.randint(0, 3, (shape[-2],), generator=generator)  # 0: as drawn, 1: no key, 2: every key
        allowed[..., modes == 1, :] = False
        allowed[..., modes == 2, :] = True
    if kind == "bool":
        return allowed.to(DEVICE)
    bias = torch.randn(shape, generator=generator, dtype=f64) * 0.7
    return bias.masked_fill(~allowed, -INF).to(DEVICE, dtype)


@pytest.mark.slow
@pytest.mark.interpreter
@examples(14)
@given(
    dtype=st.sampled_from(DTYPES),
    batch=st.integers(1, 2),
    heads=st.integers(1, 2),
    seqlen_q=st.integers(1, 70),
    seqlen_k=st.integers(1, 70),
    head_dim=st.sampled_from([16, 24, 40, 64]),
    head_dim_v=st.sampled_from([16, 32, 40]),
    layouts=st.tuples(*[st.sampled_from(list(LAYOUTS))] * 3),
    mask_kind=st.sampled_from([None, "bool", "float", "float32"]),
    mask_dims=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    mask_rank=st.integers(0, 4),
    rows_mode=st.booleans(),
    scale=st.one_of(st.none(), st.floats(-1.0, 1.0, allow_nan=False)),
    is_causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_attention_matches_reference(
    dtype, batch, heads, seqlen_q, seqlen_k, head_dim, head_dim_v, layouts, mask_kind, mask_dims, mask_rank,
    rows_mode, scale, is_causal, seed,
):
    """Through kernels.attention(backend="triton"): any strides for q, k, v, bool or float masks of
    any broadcast shape with rows that attend nothing or everything, any finite scale, causal."""
    q, k, v = qkv(batch, heads, seqlen_q, seqlen_k, head_dim, dim_v=head_dim_v, dtype=dtype, seed=seed)
    buffers, views = {}, {}
    for name, t, layout in zip("qkv", (q, k, v), layouts):
        buffers[name], views[name] = laid_out(t, layout)
    if mask_kind is not None:
        full = (batch, heads, seqlen_q, seqlen_k)
        shape = tuple(size if keep else 1 for size, keep in zip(full, mask_dims))[4 - mask_rank :]
        mask_dtype = {"bool": torch.bool, "float": dtype, "float32": f32}[mask_kind]
        generator = torch.Generator().manual_seed(seed)
        buffers["mask"] = random_mask("bool" if mask_kind == "bool" else "float", shape, mask_dtype, rows_mode, generator)
    check_attention(buffers, views, scale=scale, is_causal=is_causal, seed=seed)


@settings(max_examples=300 if ON_GPU else 60, deadline=None)
@given(
    rank=st.integers(2, 5),
    lead=st.lists(st.integers(1, 3), min_size=3, max_size=3),
    n_queries=st.integers(0, 9),
    n_keys=st.integers(1, 9),
    dim=st.integers(1, 8),
    dim_v=st.integers(1, 8),
    gqa_groups=st.sampled_from([1, 1, 2, 3]),
    mask_kind=st.sampled_from([None, "bool", "float", "causal"]),
    mask_keep=st.lists(st.booleans(), min_size=5, max_size=5),
    mask_rank=st.integers(2, 5),  # PyTorch takes no 0-dim or 1-dim mask (ours does: they broadcast)
    scale=st.one_of(st.none(), st.floats(-2.0, 2.0, allow_nan=False)),
    seed=st.integers(0, 2**16),
)
def test_property_sdpa_equals_torch(
    rank, lead, n_queries, n_keys, dim, dim_v, gqa_groups, mask_kind, mask_keep, mask_rank, scale, seed
):
    """kernels.scaled_dot_product_attention == torch.nn.functional.scaled_dot_product_attention for
    random ranks, lengths (no queries too), head dims, masks of any broadcast shape (rows with no
    key included), is_causal, scale and grouped-query attention (einsum backend, float64).
    PyTorch's is_causal scales its -inf bias along with the logits: with a scale <= 0 it returns
    NaN (see the test below), so those pairs are left out."""
    assume(mask_kind != "causal" or scale is None or scale > 0)
    generator = torch.Generator().manual_seed(seed)
    lead = lead[: rank - 2]
    kv_lead = list(lead)
    enable_gqa = rank >= 3 and gqa_groups > 1
    if enable_gqa:
        lead[-1] = kv_lead[-1] * gqa_groups  # query heads are key heads times the group size
    query = torch.randn(*lead, n_queries, dim, generator=generator, dtype=f64)
    key = torch.randn(*kv_lead, n_keys, dim, generator=generator, dtype=f64)
    value = torch.randn(*kv_lead, n_keys, dim_v, generator=generator, dtype=f64)
    full = (*lead, n_queries, n_keys)
    arguments = {"scale": scale, "enable_gqa": enable_gqa}
    if mask_kind == "causal":
        arguments["is_causal"] = True
    elif mask_kind is not None:
        shape = tuple(size if keep else 1 for size, keep in zip(full, mask_keep[-len(full):]))
        shape = shape[len(shape) - min(mask_rank, len(shape)):]
        allowed = torch.rand(shape, generator=generator) < 0.6
        if mask_kind == "bool":
            arguments["attn_mask"] = allowed
        else:
            arguments["attn_mask"] = (torch.randn(shape, generator=generator, dtype=f64)).masked_fill(~allowed, -INF)
    expected = F.scaled_dot_product_attention(query, key, value, **arguments)
    actual = kernels.scaled_dot_product_attention(query, key, value, **arguments, backend="einsum")
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("backend", ["einsum", TRITON])
def test_scale_zero_with_a_mask_averages_the_allowed_keys(backend):
    """scale = 0 makes every logit 0: each row averages the values of the keys it may attend.
    PyTorch's SDPA on the CPU returns NaN here with is_causal (it scales the causal -inf along with
    the logits: 0 * -inf; a negative scale makes it +inf); ours leaves masked keys at -inf."""
    q, k, v = qkv(1, 2, 6, 6, 16)
    out = kernels.attention(q, k, v, scale=0.0, is_causal=True, backend=backend)
    averages = v.cumsum(2) / torch.arange(1, 7, device=DEVICE).view(1, 1, 6, 1)  # row i: mean of v[:i + 1]
    torch.testing.assert_close(out, averages, rtol=1e-5, atol=1e-6)
    cpu = (t.cpu() for t in (q, k, v))  # its CPU kernel, for the record (a GPU's backends may differ)
    assert F.scaled_dot_product_attention(*cpu, scale=0.0, is_causal=True).isnan().any()


# ---------------------------------------------------------------------------------------------
# 4. Honest dispatch: a fallback is never silent.


class Placed:
    """What pick_backend reads of a tensor, its device and dtype: a CUDA float64 tensor without CUDA."""

    def __init__(self, device: str, dtype: torch.dtype):
        self.device, self.dtype = torch.device(device), dtype


def test_auto_with_float64_on_cuda_says_why_once(fresh_warnings):
    with pytest.warns(UserWarning, match=r"einsum fallback: attention got torch.float64, and the Triton kernels "
                                         r"take float16, bfloat16 or float32") as record:
        assert backend_choice.pick_backend("auto", "attention", [Placed("cuda", f64)]) == "einsum"
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend_choice.pick_backend("auto", "attention", [Placed("cuda", f64)]) == "einsum"  # once only
        assert backend_choice.pick_backend(None, "attention", [Placed("cuda", f32)]) == "triton"  # no fallback: silent
    with pytest.warns(UserWarning, match="patch_embed got torch.float64"):  # each op says it for itself
        assert backend_choice.pick_backend("auto", "patch_embed", [Placed("cuda", f64)]) == "einsum"
    one_line_error(TypeError, "float16, bfloat16 or float32, got torch.float64",
                   backend_choice.pick_backend, "triton", "attention", [Placed("cuda", f64)])


@pytest.mark.parametrize("interpreter", ["0", "1"])
def test_auto_on_cpu_says_why_once_through_the_public_functions(fresh_warnings, monkeypatch, interpreter):
    """CPU tensors under "auto" run the reference, interpreter or not, and each public function says
    so once, pointing at the line that called it."""
    monkeypatch.setenv("TRITON_INTERPRET", interpreter)
    q, k, v = qkv(device="cpu")
    images, weight = randn(1, 3, 16, 16, device="cpu"), randn(8, 3, 8, 8, device="cpu")
    calls = {
        "attention": lambda: kernels.attention(q, k, v, backend="auto"),
        "patch_embed": lambda: kernels.patch_embed(images, weight, backend="auto"),
    }
    for op, call in calls.items():
        with pytest.warns(UserWarning, match=f"vitriton: using the einsum fallback: {op} got tensors on cpu") as record:
            call()
        assert len(record) == 1 and record[0].filename == __file__
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            call()
