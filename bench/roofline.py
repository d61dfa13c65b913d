"""The work each benchmark does (FLOPs, minimum bytes) and the machine limits it is compared with.

The work belongs to the problem, not to the provider: every provider in a group is credited with
the same FLOPs and the same minimum bytes, so TFLOP/s and roofline fractions compare directly.

    attention   forward 4*B*H*Nq*Nk*D FLOPs (q k^T and p v, 2 FLOPs per multiply-add);
                the backward counts 2.5x that (dV, dP, dS->dQ, dS->dK, plus recomputing q k^T),
                so forward + backward is 3.5x. Bytes: read q, k, v, write o; the backward also
                reads q, k, v, o, dO and writes dQ, dK, dV (the log-sum-exp is negligible).
    patch       2*B*N*K*D FLOPs, K = C*P*P. The images are data and need no gradient, so the
                backward is the weight gradient alone: another 2*B*N*K*D.
    model       the matmuls of a ViT forward (patch projection, qkv, attention, proj, MLP, head),
                times 3 for a training step (backward about twice the forward): an approximation,
                reported with images/s, which needs no model of the work.

The roofline fraction of a measured time t is max(FLOPs / compute ceiling, bytes / bandwidth) / t:
the share of the binding limit reached, 1.0 being the roofline itself.
"""

from __future__ import annotations

import dataclasses
import time

import torch

BACKWARD_FACTOR = 2.5  # attention backward FLOPs per forward FLOP (FlashAttention-2's count)


@dataclasses.dataclass(frozen=True)
class Work:
    """What one timed call must do at the least: floating-point operations and bytes moved."""

    flops: float
    bytes: float | None  # None: no meaningful minimum (a whole model); compute roofline only


def attention_work(batch: int, heads: int, n_q: int, n_k: int, head_dim: int, dtype: torch.dtype, backward: bool) -> Work:
    flops = 4 * batch * heads * n_q * n_k * head_dim
    q_or_o = batch * heads * n_q * head_dim  # elements of q, o, dO, dQ
    k_or_v = batch * heads * n_k * head_dim  # elements of k, v, dK, dV
    elements = 2 * q_or_o + 2 * k_or_v  # read q, k, v; write o
    if backward:
        flops *= 1 + BACKWARD_FACTOR
        elements += 3 * q_or_o + 2 * k_or_v  # read q, o, dO, k, v
        elements += q_or_o + 2 * k_or_v  # write dQ, dK, dV
    return Work(float(flops), float(elements * dtype.itemsize))


def patch_embed_work(
    batch: int, channels: int, image: int, patch: int, dim: int, dtype: torch.dtype, backward: bool
) -> Work:
    n_patches = (image // patch) ** 2
    k = channels * patch * patch
    flops = 2 * batch * n_patches * k * dim
    images = batch * channels * image * image
    weight, tokens = dim * k, (1 + n_patches) * dim  # tokens: the class token and the patches
    # read images, weight, bias, class token, position embeddings; write (B, 1 + N, D)
    elements = images + weight + 2 * dim + tokens + batch * tokens
    if backward:
        flops *= 2  # the weight gradient; the images need none
        elements += batch * tokens + images  # read dTokens and the images again
        elements += weight + 2 * dim + tokens  # write dW, dBias, dClass, dPos
    return Work(float(flops), float(elements * dtype.itemsize))


def vit_forward_flops(image: int, patch: int, dim: int, depth: int, mlp_ratio: float, num_classes: int, channels: int = 3) -> float:
    """Matmul FLOPs of one image through a ViT forward (norms, softmax, GELU left out: < 1%)."""
    n_patches = (image // patch) ** 2
    n = 1 + n_patches
    hidden = int(dim * mlp_ratio)
    patches = 2 * n_patches * channels * patch * patch * dim
    per_block = 2 * n * dim * (3 * dim + dim + 2 * hidden) + 4 * n * n * dim  # linears, then q k^T and p v
    return float(patches + depth * per_block + 2 * dim * num_classes)


def model_work(batch: int, forward_flops_per_image: float, train: bool) -> Work:
    return Work(batch * forward_flops_per_image * (3 if train else 1), None)


# ---------------------------------------------------------------------------------------------
# The machine's limits, measured once per session (bench/conftest.py's ``machine_limits``).


@dataclasses.dataclass(frozen=True)
class MachineLimits:
    """Measured ceilings: a large matmul's TFLOP/s and a large copy's GB/s, the best of a few runs."""

    device: str
    tflops: float
    tflops_how: str
    gbs: float
    gbs_how: str

    def describe(self, work: Work, seconds: float) -> dict:
        """TFLOP/s, GB/s and the fraction of the binding roofline reached by ``work`` in ``seconds``."""
        compute_s = work.flops / (self.tflops * 1e12)
        memory_s = work.bytes / (self.gbs * 1e9) if work.bytes is not None else 0.0
        info = {
            "tflops": work.flops / seconds / 1e12,
            "compute_fraction": compute_s / seconds,
            "bound": "compute" if compute_s >= memory_s else "memory",
            "roofline_fraction": max(compute_s, memory_s) / seconds,
        }
        if work.bytes is not None:
            info["gbs"] = work.bytes / seconds / 1e9
            info["bandwidth_fraction"] = memory_s / seconds
        return info


def _best_seconds(fn, synchronize, repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``fn`` after two warm-up calls, each synchronised."""
    for _ in range(2):
        fn()
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _matmul_seconds(size: int, dtype: torch.dtype, device: torch.device, synchronize, repeats: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    return _best_seconds(lambda: torch.matmul(a, b, out=out), synchronize, repeats)


def _copy_seconds(n_bytes: int, device: torch.device, synchronize, repeats: int) -> float:
    src = torch.empty(n_bytes, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return _best_seconds(lambda: dst.copy_(src), synchronize, repeats)


def measure_limits(device: torch.device) -> MachineLimits:
    """Time a large matmul and a large copy on ``device``: the ceilings the roofline is drawn from.

    On a GPU: a bf16 8192^3 matmul (tensor cores; fp16 has the same peak on H100) and a 1 GiB
    device-to-device copy (read + write counted). On a CPU, sizes that take well under a second,
    in float32 (the dtype the CPU benchmarks use). The best run is kept: a ceiling, not a typical.
    """
    if device.type == "cuda":
        synchronize = torch.cuda.synchronize
        size, dtype, copy_bytes, repeats = 8192, torch.bfloat16, 1 << 30, 10
        name = torch.cuda.get_device_name(device)
    else:
        def synchronize():
            return None

        size, dtype, copy_bytes, repeats = 1024, torch.float32, 64 << 20, 5
        name = "cpu"
    matmul_s = _matmul_seconds(size, dtype, device, synchronize, repeats)
    copy_s = _copy_seconds(copy_bytes, device, synchronize, repeats)
    return MachineLimits(
        device=name,
        tflops=2 * size**3 / matmul_s / 1e12,
        tflops_how=f"{str(dtype).removeprefix('torch.')} {size}^3 matmul, best of {repeats}",
        gbs=2 * copy_bytes / copy_s / 1e9,
        gbs_how=f"{copy_bytes >> 20} MiB device copy (read + write), best of {repeats}",
    )
