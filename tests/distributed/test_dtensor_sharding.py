"""DTensor inputs to every custom op (issue 22, item 1), against the same call on one process.

Two gloo ranks on the CPU, the Triton kernels in the interpreter at tiny sizes, started as torchrun
starts them (``tests.distributed.launch``: ``python -m tests.distributed.test_dtensor_sharding CHECK...``),
several checks per start. For attention (the output and the gradients of q, k, v and a float bias), varlen
and the patch projection (images, weight, bias, cls, pos), through backend="triton" and "einsum":
- sharded by batch or by heads (the patch projection: batch or embedding dim): the same result as
  one process, the output sharded alike, and, through the kernels, no communication at all in the
  forward and the backward (``CommDebugMode`` counts none);
- keys sharded by sequence, queries by sequence (context parallel's layout), a Partial input, a
  causal call after a non-causal one of the same shapes (DTensor's cache keyed by is_causal):
  redistributed, the same result;
- the rules have teeth: with a wrong rule registered (keys sharded by sequence claimed local) the
  result differs from one process; with ours registered again it is right.
In this process (fast): the shape-only fake kernels give the real outputs' shapes, strides, dtypes.
"""

from __future__ import annotations

import sys

import pytest
import torch

import kernels
from tests.distributed import WORLD, launch, main

B, H, NQ, NK, D = 2, 2, 6, 10, 16  # attention (B, H, N, D): every dim shardable over 2 ranks
ATOL, RTOL = 3e-5, 1e-5  # the same float32 kernel on slices: only the summation order may differ


# ---------------------------------------------------------------------------------------------
# The checks, run on every rank.


def _leaf(mesh, t: torch.Tensor, placement):
    """A leaf DTensor holding ``t`` with one placement (all ranks hold the same ``t``; no communication)."""
    from torch.distributed.tensor import DTensor, Partial, distribute_tensor

    if isinstance(placement, Partial):  # each rank holds t / WORLD: the sum is t
        return DTensor.from_local(t / WORLD, mesh, [placement], run_check=False).requires_grad_()
    return distribute_tensor(t, mesh, [placement], src_data_rank=None).requires_grad_()


def _compare(name: str, actual, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.full_tensor(), expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def _run_both(mesh, fn, inputs: dict, placements: dict, *, local: bool, name: str, backward: bool = True):
    """``fn(**inputs)`` on one process and on DTensors with ``placements``: the output and (``backward``) the
    gradient of every input that has a placement agree; with ``local``, no communication at all. The
    output's placements."""
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    torch.manual_seed(1)
    single = {key: (t.clone().requires_grad_() if key in placements else t) for key, t in inputs.items()}
    out = fn(**single)
    upstream = torch.randn(out.shape)
    out.backward(upstream)
    shared = {key: (_leaf(mesh, t, placements[key]) if key in placements else t) for key, t in inputs.items()}
    with CommDebugMode() as forward_comm:
        dout = fn(**shared)
    upstream_dt = distribute_tensor(upstream, mesh, dout.placements, src_data_rank=None)
    with CommDebugMode() as backward_comm:
        if backward:
            dout.backward(upstream_dt)
    if local:
        counts = (forward_comm.get_comm_counts(), backward_comm.get_comm_counts())
        assert forward_comm.get_total_counts() == backward_comm.get_total_counts() == 0, f"{name}: communication {counts}"
    _compare(f"{name} output", dout, out)
    for key in placements if backward else ():
        _compare(f"{name} grad {key}", shared[key].grad, single[key].grad)
    return dout.placements


def _attention_inputs(bias_shape=None) -> dict:
    g = torch.Generator().manual_seed(0)
    inputs = {
        "q": torch.randn(B, H, NQ, D, generator=g),
        "k": torch.randn(B, H, NK, D, generator=g),
        "v": torch.randn(B, H, NK, D, generator=g),
    }
    if bias_shape is not None:
        inputs["mask"] = torch.randn(bias_shape, generator=g)
    return inputs


def check_attention(mesh, backend: str) -> None:
    """Through the kernels, the output and every gradient; through einsum the output only (see
    ``check_einsum_backward``)."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    def attend(is_causal=False):
        return lambda q, k, v, mask=None: kernels.attention(q, k, v, mask, is_causal=is_causal, backend=backend)

    triton = backend == "triton"
    cases = [  # einsum: not causal (see check_einsum_causal)
        # (name, bias shape, placements of q, k, v, bias, causal, the output's placement when local)
        ("heads", None, (Shard(1),) * 3, False, Shard(1)),
        ("heads causal, bias (1, H, Nq, Nk)", (1, H, NQ, NK), (Shard(1),) * 3 + (Shard(1),), True, Shard(1)),
        ("batch, bias (B, 1, Nq, Nk) replicated", (B, 1, NQ, NK), (Shard(0),) * 3 + (Replicate(),), False, None),
        ("batch, bias (B, H, Nq, Nk)", (B, H, NQ, NK), (Shard(0),) * 4, False, Shard(0)),
        ("keys by sequence", None, (Replicate(), Shard(2), Shard(2)), False, None),
        ("all by sequence", None, (Shard(2),) * 3, False, None),
        ("all by sequence, causal", None, (Shard(2),) * 3, True, None),
        ("a partial q", None, (Partial(), Shard(1), Shard(1)), False, None),
    ]
    for name, bias_shape, placements, is_causal, local in cases:
        if is_causal and not triton:
            continue
        inputs = _attention_inputs(bias_shape)
        name = f"attention {backend} {name}"
        got = _run_both(
            mesh, attend(is_causal), inputs, dict(zip(inputs, placements)), local=triton and local is not None,
            name=name, backward=triton,
        )
        if triton and local is not None:
            assert got == (local,), f"{name}: output {got}, expected ({local},)"
        if triton and name.endswith("all by sequence"):  # queries stay local, keys and values gathered
            assert got == (Shard(2),), f"{name}: output {got}, expected (Shard(2),)"


def check_einsum_backward(mesh) -> None:
    """The einsum fallback's gradients on head-sharded DTensors."""
    from torch.distributed.tensor import Shard

    def attend(q, k, v):
        return kernels.attention(q, k, v, backend="einsum")

    inputs = _attention_inputs()
    _run_both(mesh, attend, inputs, dict.fromkeys(inputs, Shard(1)), local=False, name="attention einsum backward")


def check_einsum_causal(mesh) -> None:
    """The einsum fallback's causal forward on head-sharded DTensors."""
    from torch.distributed.tensor import Shard

    def attend(q, k, v):
        return kernels.attention(q, k, v, is_causal=True, backend="einsum")

    inputs = _attention_inputs()
    _run_both(mesh, attend, inputs, dict.fromkeys(inputs, Shard(1)), local=False, name="einsum causal", backward=False)


def check_wrong_rule(mesh) -> None:
    """A rule that claims sequence-sharded keys are local gives a wrong answer; ours, registered again, the right one."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache
    from torch.distributed.tensor.experimental import register_sharding

    from kernels.triton import sharding

    inputs = _attention_inputs()
    expected = kernels.attention(**inputs, backend="triton")
    shared = [distribute_tensor(inputs["q"], mesh, [Replicate()], src_data_rank=None)] + [
        distribute_tensor(inputs[key], mesh, [Shard(2)], src_data_rank=None) for key in ("k", "v")
    ]
    r, s = Replicate(), Shard(2)

    def keys_by_sequence_are_local(q, k, v, mask, dropout_seed, *scalars):
        return [([r, r], [r, s, s, None, None, None, None, None, None])]

    op = torch.ops.vitriton.attention_forward.default
    try:
        register_sharding(op)(keys_by_sequence_are_local)
        _clear_sharding_prop_cache()
        wrong = kernels.attention(*shared, backend="triton")
        assert isinstance(wrong, DTensor) and wrong.placements == (r,)
        assert not torch.allclose(wrong.to_local(), expected, atol=1e-3), "the wrong rule gave the right answer"
    finally:
        sharding.register("attention_forward")
        _clear_sharding_prop_cache()
    _compare("attention with our rule again", kernels.attention(*shared, backend="triton"), expected)


def check_varlen(mesh, public: bool = False) -> None:
    """The kernels' varlen ops on DTensors (``public``: through ``kernels.attention_varlen``, whose checks read
    cu_seqlens on the host)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from kernels.triton.attention_ops import attention_varlen_triton

    g = torch.Generator().manual_seed(2)
    lengths_q, lengths_k = [3, 5], [4, 6]
    cu_q = torch.tensor([0, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 10], dtype=torch.int32)
    cu_q_dt, cu_k_dt = (distribute_tensor(t, mesh, [Replicate()], src_data_rank=None) for t in (cu_q, cu_k))
    inputs = {
        "q": torch.randn(sum(lengths_q), H, D, generator=g),
        "k": torch.randn(sum(lengths_k), H, D, generator=g),
        "v": torch.randn(sum(lengths_k), H, D, generator=g),
    }
    for name, placement, is_causal, local in (
        ("heads", Shard(1), False, True), ("heads causal", Shard(1), True, True), ("packed rows", Shard(0), False, False),
    ):
        name = f"varlen {name}"

        def fn(q, k, v, is_causal=is_causal):
            cu = (cu_q_dt, cu_k_dt) if isinstance(q, DTensor) else (cu_q, cu_k)
            if public:
                return kernels.attention_varlen(q, k, v, *cu, max(lengths_q), max(lengths_k), is_causal=is_causal, backend="triton")
            return attention_varlen_triton(q, k, v, *cu, max(lengths_q), max(lengths_k), is_causal=is_causal)

        got = _run_both(mesh, fn, inputs, dict.fromkeys(inputs, placement), local=local, name=name)
        if local:
            assert got == (Shard(1),), f"{name}: output {got}"


def check_patch_embed(mesh, backend: str) -> None:
    from torch.distributed.tensor import Replicate, Shard

    g = torch.Generator().manual_seed(3)
    dim, channels, patch, side, prefix = 32, 3, 4, 8, 1
    inputs = {
        "images": torch.randn(2, channels, side, side, generator=g),
        "weight": torch.randn(dim, channels, patch, patch, generator=g) * 0.1,
        "bias": torch.randn(dim, generator=g),
        "cls_token": torch.randn(1, prefix, dim, generator=g),
        "pos_embed": torch.randn(1, prefix + (side // patch) ** 2, dim, generator=g),
    }

    def project(images, weight, bias, cls_token, pos_embed):
        return kernels.patch_embed(images, weight, bias, cls_token, pos_embed, backend=backend)

    r = Replicate()
    for name, placements, local in (
        ("batch", (Shard(0), r, r, r, r), Shard(0)),
        ("embedding dim", (r, Shard(0), Shard(0), Shard(2), Shard(2)), Shard(2)),
        ("images by rows", (Shard(2), r, r, r, r), None),
    ):
        name = f"patch_embed {backend} {name}"
        got = _run_both(
            mesh, project, inputs, dict(zip(inputs, placements)), local=backend == "triton" and local is not None, name=name
        )
        if backend == "triton" and local is not None:
            assert got == (local,), f"{name}: output {got}"


def check_fp8(mesh) -> None:
    """FP8 attention (the interpreter) on DTensors: by batch or heads (the descales alike) with no
    communication, the output equal to one process's. (Other placements are redistributed as for
    16-bit inputs, but gloo moves no float8 tensor: "Invalid scalar type"; not testable on a CPU.)"""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (NQ, NK, NK))
    q8, k8, v8, *descales = kernels.quantize_fp8(q, k, v)
    with torch.no_grad():
        expected = kernels.attention(
            q8, k8, v8, q_descale=descales[0], k_descale=descales[1], v_descale=descales[2], out_dtype=torch.float32,
            backend="triton",
        )
        for qkv_placements, descale_placement, local in (
            ((Shard(0),) * 3, Shard(0), True), ((Shard(1),) * 3, Shard(1), True), ((Replicate(),) * 3, Replicate(), True),
        ):
            tensors = [distribute_tensor(t, mesh, [p], src_data_rank=None) for t, p in zip((q8, k8, v8), qkv_placements)]
            scales = [distribute_tensor(d, mesh, [descale_placement], src_data_rank=None) for d in descales]
            with CommDebugMode() as comm:
                out = kernels.attention(
                    *tensors, q_descale=scales[0], k_descale=scales[1], v_descale=scales[2], out_dtype=torch.float32,
                    backend="triton",
                )
            name = f"fp8 {qkv_placements}"
            if local:
                assert comm.get_total_counts() == 0, f"{name}: communication {comm.get_comm_counts()}"
                assert out.placements == (descale_placement,), f"{name}: output {out.placements}"
            _compare(name, out, expected)


CHECKS = {
    "fp8": check_fp8,
    "attention_triton": lambda mesh: check_attention(mesh, "triton"),
    "attention_einsum": lambda mesh: check_attention(mesh, "einsum"),
    "einsum_backward": check_einsum_backward,
    "wrong_rule": check_wrong_rule,
    "varlen": check_varlen,
    "varlen_public": lambda mesh: check_varlen(mesh, public=True),
    "einsum_causal": check_einsum_causal,
    "patch_embed_triton": lambda mesh: check_patch_embed(mesh, "triton"),
    "patch_embed_einsum": lambda mesh: check_patch_embed(mesh, "einsum"),
}


# ---------------------------------------------------------------------------------------------
# The tests.

MODULE = "tests.distributed.test_dtensor_sharding"


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.interpreter
def test_attention_sharded_by_batch_and_heads_is_local_and_the_rest_redistributed():
    launch(MODULE, ["attention_triton", "attention_einsum", "wrong_rule"])


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.interpreter
def test_varlen_patch_embed_and_fp8_sharded():
    launch(MODULE, ["varlen", "patch_embed_triton", "patch_embed_einsum", "fp8"])


@pytest.mark.slow
@pytest.mark.subprocess
def test_einsum_backward_on_dtensors():
    launch(MODULE, ["einsum_backward"])


@pytest.mark.slow
@pytest.mark.subprocess
def test_einsum_causal_on_dtensors():
    launch(MODULE, ["einsum_causal"])


@pytest.mark.slow
@pytest.mark.subprocess
def test_public_varlen_on_dtensors():
    launch(MODULE, ["varlen_public"])


@pytest.mark.interpreter
def test_fake_kernels_match_the_real_outputs():
    """The shape-only fake kernels (what DTensor runs to learn output shapes) against the real ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kernels.triton import attention_fp8, attention_ops, patch_embed  # noqa: F401  (registers the ops)
    from kernels.triton.sharding import _FAKES
    from tests.equivalence import DEVICE

    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 3, 5, 16, generator=g), torch.randn(2, 3, 7, 16, generator=g), torch.randn(2, 3, 7, 24, generator=g)
    bias = torch.randn(1, 3, 5, 7, generator=g)
    images, weight = torch.randn(2, 3, 8, 8, generator=g), torch.randn(32, 3, 4, 4, generator=g)
    cls, pos = torch.randn(1, 2, 32, generator=g), torch.randn(1, 6, 32, generator=g)
    # The real ops on DEVICE: CUDA tensors on a GPU, where the interpreter (which takes CPU ones) is off.
    q, k, v, bias, images, weight, cls, pos = (t.to(DEVICE) for t in (q, k, v, bias, images, weight, cls, pos))
    qp, kp, vp = (t.transpose(1, 2).reshape(-1, 3, t.shape[-1]) for t in (q, k, v))
    cu_q = torch.tensor([0, 5, 10], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 7, 14], dtype=torch.int32, device=DEVICE)
    descales = torch.ones(2, 3, 3, device=DEVICE)
    ops = torch.ops.vitriton
    out, stats = ops.attention_forward(q, k, v, bias, None, 0.25, 0.0, False, False)
    out_p, stats_p = ops.attention_varlen_forward(qp, kp, vp, cu_q, cu_k, 5, 7, None, 0.25, 0.0, False, False)
    tokens = ops.patch_embed_forward(images, weight, None, cls, pos)
    calls = {
        "attention_forward": (q, k, v, bias, None, 0.25, 0.0, False, False),
        "attention_backward": (out, q, k, v, out, stats, bias, None, 0.25, 0.0, False, False, True),
        "attention_varlen_forward": (qp, kp, vp, cu_q, cu_k, 5, 7, None, 0.25, 0.0, False, False),
        "attention_varlen_backward": (out_p, qp, kp, vp, out_p, stats_p, cu_q, cu_k, 5, 7, None, 0.25, 0.0, False, False),
        "attention_fp8_forward": (*(t.to(torch.float8_e4m3fn) for t in (q, k, v)), descales, bias, 0.25,
                                  False, torch.bfloat16),
        "attention_fp8_varlen_forward": (*(t.to(torch.float8_e4m3fn) for t in (qp, kp, vp)), cu_q, cu_k, 5, 7,
                                         descales, 0.25, False, torch.float16),
        "patch_embed_forward": (images, weight, None, cls, pos),
        "patch_embed_grad_weight": (tokens[:, 2:], images, weight),
        "patch_embed_grad_images": (tokens[:, 2:], images, weight),
    }
    assert set(calls) == set(_FAKES)
    for name, args in calls.items():
        real = getattr(ops, name)(*args)
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = _FAKES[name](*args)
        for i, (r, f) in enumerate(zip(torch.utils._pytree.tree_leaves(real), torch.utils._pytree.tree_leaves(fake), strict=True)):
            assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype), f"{name} output {i}"


if __name__ == "__main__":
    main(sys.argv[1:], CHECKS)
