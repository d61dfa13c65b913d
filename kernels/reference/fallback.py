"""The einsum fallback: what ``kernels.attention`` runs when the dispatch picks ``"einsum"``.

The oracle's arithmetic (``kernels/reference/oracle.py``) a chunk of the score matrix at a time
(memory bounded, forward and backward), logits and softmax in float32 for float16/bfloat16
inputs, under every autograd transform; tests/test_fallback.py holds it to the oracle.
"""

from __future__ import annotations

import itertools
import math

import torch

# The CPU fallback: the reference's arithmetic a chunk of the score matrix at a time, logits and
# softmax in float32 for float16/bfloat16 inputs, under every autograd transform.

CHUNK_ELEMENTS = 2**19  # scores made at once: 2 MiB of float32, half in each core's L2 on 2 cores
LOG2E = math.log2(math.e)  # logits are kept in base 2: exp2 is cheaper than exp on the CPU
LN2 = math.log(2.0)


def _chunks(shape: tuple[int, int, int, int]) -> tuple[list[slice], list[slice], list[slice]]:
    """Batch, head and query-row slices that cut the (B, H, Nq, Nk) scores into chunks.

    A chunk holds at most CHUNK_ELEMENTS scores (or one query row): all of them when they fit,
    else whole batch elements, else heads of one, else query rows of one head. A chunk of one
    batch element reads q, k, v through their strides (views of a fused qkv), copying nothing;
    long rows of few heads keep the matmuls large.
    """
    batch, heads, n_queries, n_keys = shape
    every = [slice(None)]

    def cut(size: int, step: int) -> list[slice]:
        return [slice(i, i + step) for i in range(0, size, step)]

    per_head = n_queries * n_keys
    if batch * heads * per_head <= CHUNK_ELEMENTS:
        return every, every, every
    if heads * per_head <= CHUNK_ELEMENTS:
        return cut(batch, CHUNK_ELEMENTS // (heads * per_head)), every, every
    if per_head <= CHUNK_ELEMENTS:
        return cut(batch, 1), cut(heads, CHUNK_ELEMENTS // per_head), every
    return cut(batch, 1), cut(heads, 1), cut(n_queries, max(1, CHUNK_ELEMENTS // n_keys))


def _piece(t: torch.Tensor | None, batch: slice, heads: slice, rows: slice = slice(None)) -> torch.Tensor | None:
    """What a chunk reads of a (B, H, Nq, ...) tensor, or of one broadcast along B, H or Nq: t itself if all."""
    if t is None:
        return None
    cut = tuple(part if size > 1 else slice(None) for part, size in zip((batch, heads, rows), t.shape))
    return t if all(part == slice(None) for part in cut) else t[cut]


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _collect(held: list[torch.Tensor], part: torch.Tensor, summed: bool) -> None:
    """Keep a chunk's part: appended, to be concatenated, or added to the one part held."""
    if summed and held:
        held[0] = held[0] + part
    else:
        held.append(part)


def _over_chunks(shape, compute, summed: tuple[tuple[int, ...], ...], into=None) -> tuple:
    """Run ``compute(batch, heads, rows, index)`` on every chunk and put each of its outputs together.

    Output n's parts are concatenated along the batch, head and query-row dims (0, 1, 2), or
    added up along the dims in ``summed[n]``, those it does not have (k's gradient has no query
    rows; a bias may be broadcast along any of the three). ``into``: for plain tensors (see
    ``_plain``), a function allocating the outputs (zeros where summed) that the parts are written
    into; else the parts are concatenated, as autograd and vmap can follow. One chunk's parts are
    the outputs themselves.
    """
    cuts = _chunks(shape)
    if all(len(cut) == 1 for cut in cuts):
        return tuple(compute(*(cut[0] for cut in cuts), 0))
    if into is not None:
        into = into()
        for index, chunk in enumerate(itertools.product(*cuts)):
            for whole, part, dims in zip(into, compute(*chunk, index), summed):
                where = whole[tuple(slice(None) if d in dims else cut for d, cut in enumerate(chunk))]
                if dims:
                    where.add_(part)
                else:
                    where.copy_(part)
        return into
    index = itertools.count()  # the same order as itertools.product above

    def join(dim: int, chosen: tuple[slice, ...]) -> tuple:
        held = [[] for _ in summed]
        for part in cuts[dim]:
            parts = compute(*chosen, part, next(index)) if dim == 2 else join(dim + 1, (*chosen, part))
            for kept, new, dims in zip(held, parts, summed):
                _collect(kept, new, dim in dims)
        return tuple(_cat(kept, dim) for kept in held)

    return join(0, ())


def _plain(tensors) -> bool:
    """Whether the chunks may reuse one buffer for their scores, work in place and write into outputs.

    Only plain tensors outside autograd's recording: not while compiling, not under torch.func or
    the older vmap of ``torch.autograd.grad(is_grads_batched=True)`` (they run this code on
    batched tensors, and an in-place op cannot put a batched operand into an unbatched tensor),
    not when the backward is itself recorded (double backward: ``out=`` ops have no derivative).
    It saves an allocation, and its page faults, per chunk.
    """
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return False
    functorch = torch._C._functorch
    wrapped = (functorch.is_functorch_wrapped_tensor(t) or functorch.is_legacy_batchedtensor(t) for t in tensors if t is not None)
    return not any(wrapped)


def _recorded(tensors) -> bool:
    """Whether autograd, forward mode or a torch.func transform may want derivatives of this call."""
    if torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0:
        return True
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors if t is not None)


def _scratch(shape, like: torch.Tensor) -> torch.Tensor:
    """A buffer the size of the largest (the first) chunk's scores."""
    first = (len(range(*cuts[0].indices(size))) for cuts, size in zip(_chunks(shape), shape))
    return like.new_empty(math.prod(first) * shape[3])


def _buffer_for(buffer: torch.Tensor | None, shape) -> torch.Tensor | None:
    return None if buffer is None else buffer[: math.prod(shape)].view(shape)


def _keep_mask(seed: int | None, index: int, shape, dropout_p: float, device) -> torch.Tensor:
    """Chunk ``index``'s dropout keep mask (True = kept), drawn from (seed, index): the backward draws it again.

    ``seed`` None (under torch.compile, which makes no generator): from torch's default generator.
    """
    if seed is None:
        return torch.rand(shape, device=device) >= dropout_p
    generator = torch.Generator(device=device).manual_seed(hash((seed, index)) % 2**63)
    return torch.rand(shape, generator=generator, device=device) >= dropout_p


def _base2_bias(bias: torch.Tensor) -> torch.Tensor:
    """A float mask in base-2 units, LOG2E * bias, with every finite value kept finite.

    Times LOG2E a bias below finfo.min / LOG2E (a "masked" bias of finfo.min, as Hugging Face
    writes it, in any dtype) overflows to -inf, and a row of them would read as fully masked:
    zeros, where the reference, SDPA and the Triton kernel average v. So finite values below
    finfo.min / 2 are raised to it first (a logit of 0.72 finfo.min, with room for q k^T): only
    -inf masks a key, and NaN stays NaN. The raise is a constant to autograd, so the bias keeps
    its exact gradient, forward and backward.
    """
    finfo = torch.finfo(bias.dtype)
    # finfo.min / 2 - bias: > 0 only below the floor; +inf for -inf, which finfo.max keeps -inf.
    raised = (finfo.min / 2 - bias).clamp(0, finfo.max).detach()
    return (bias + raised) * LOG2E


def _rounded(t: torch.Tensor, dtype: torch.dtype, factor: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    """factor * t rounded to ``dtype``, in one pass: a product's operand; written into ``buffer`` when given."""
    if buffer is None:
        return (t * factor).to(dtype)
    return torch.mul(t, factor, out=_buffer_for(buffer, t.shape))


def _logits(q, k, bias, mask, is_causal: bool, rows: slice, buffer: torch.Tensor | None) -> torch.Tensor:
    """One chunk's base-2 logits, q k^T + bias and -inf where masked: (b, h, rows, Nk).

    q comes scaled by scale * LOG2E, the bias in base 2 (``_base2_bias``). Written into
    ``buffer`` when given (see ``_plain``), and then changed in place; else each step makes a new
    tensor, as autograd and vmap need.
    """
    logits = torch.matmul(q, k.transpose(-1, -2), out=_buffer_for(buffer, (*q.shape[:-1], k.shape[-2])))
    if bias is not None:
        logits = logits.add_(bias) if buffer is not None else logits + bias
    if mask is not None:
        logits = logits.masked_fill_(~mask, float("-inf")) if buffer is not None else logits.masked_fill(~mask, float("-inf"))
    if is_causal:  # query first + i sees keys j <= first + i
        n_rows, n_keys = logits.shape[-2:]
        # new_ones, not torch.ones: a DTensor's logits get a (replicated) DTensor mask to meet.
        later = logits.new_ones((n_rows, n_keys), dtype=torch.bool).triu((rows.start or 0) + 1)
        logits = logits.masked_fill_(later, float("-inf"))
    return logits


class _ChunkedAttention(torch.autograd.Function):
    """softmax(logits) v, a chunk of the logits at a time; q comes scaled, q, k and a bias in one float dtype.

    The logits are q k^T + bias in base 2 (q scaled by scale * LOG2E, the bias by LOG2E), so the
    weights are exp2(logit - max) / sum. Returns the output, the row maximum and the log2 of the
    row sum: together the row's log-sum-exp, kept as two terms so that a huge maximum (a bias of
    finfo.min) cannot round the sum away. The probabilities are not kept: the backward and the
    jvp make them again, chunk by chunk, from those two. The maximum is a constant to autograd, as
    in ``safe_softmax``; the log-sum is a differentiable output, so the backward, written in
    differentiable torch ops, has exact derivatives (double backward). ``jvp`` is forward mode;
    ``generate_vmap_rule`` gives vmap and the torch.func transforms built on it.

    A bfloat16 v (q and k in float32) is multiplied as SDPA's CPU kernel does: the weights, made in
    float32 and normalised, rounded to bfloat16 once for p v and p^T grad_out, whose sums are
    float32 and results bfloat16 (rounded once: the output itself, and dv when a chunk holds every
    query row). Only for plain tensors (``_plain``); under autograd's recording or a transform,
    float32 products.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, bias, mask, is_causal, dropout_p, seed):
        return _forward(q, k, v, bias, mask, is_causal, dropout_p, seed)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, bias, mask, is_causal, dropout_p, seed = inputs
        out, row_max, log_sum = output
        ctx.mark_non_differentiable(row_max)
        ctx.save_for_backward(q, k, v, bias, mask, out, row_max, log_sum)
        ctx.save_for_forward(q, k, v, bias, mask, out, row_max, log_sum)
        ctx.settings = (is_causal, dropout_p, seed)
        # An unused output's gradient comes as None, made below like the output: autograd's own zeros
        # would be plain tensors where the outputs are DTensors.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_out, _grad_max, grad_log_sum):
        saved = ctx.saved_tensors  # once: under torch.utils.checkpoint each read unpacks them again
        q, k, v, bias, _, out, _, log_sum = saved
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        grad_log_sum = torch.zeros_like(log_sum) if grad_log_sum is None else grad_log_sum
        shape = (*q.shape[:3], k.shape[2])
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        plain = _plain((grad_out, grad_log_sum, *saved))
        low = plain and v.dtype != q.dtype  # a bfloat16 v: see above
        v_, grad_out_ = v.to(q.dtype), grad_out.to(q.dtype)
        # p = exp2(logit - max) / sum = e / sum, and in base 2 dp/dlogit carries ln 2:
        #   dL/dlogit = p * (ln2 * (dL/dp - delta) + dL/dlog_sum),  delta = rowsum(p * dL/dp) = grad_out . out.
        # The chunks make e again; the row factors 1 / sum and ln 2 go on grad_out and delta (Nq x Dv), not on Nq x Nk.
        inv_sum = torch.exp2(-log_sum)  # (B, H, Nq, 1)
        grad_out_p = grad_out_ * inv_sum
        grad_out_ln2 = grad_out_p * LN2
        # A bfloat16 out is rounded: then delta from the float32 terms, rowsum(e * grad_e), in the chunks.
        delta = None if low else ((grad_out_ * out).sum(-1, keepdim=True) * LN2 - grad_log_sum) * inv_sum
        whole_rows = len(_chunks(shape)[2]) == 1  # a chunk's dv is then all of it, rounded once
        buffers = (_scratch(shape, q), _scratch(shape, q)) if plain else (None, None)
        rounding = _scratch(shape, v) if low else None

        def chunk(batch, heads, rows, index):
            e, dropped = _exp_logits(saved, ctx.settings, batch, heads, rows, index, buffers[0])  # (b, h, rows, Nk)
            kept = e if dropped is None else e * dropped
            inv_sum_ = _piece(inv_sum, batch, heads, rows)
            if low and whole_rows:  # p rounded to bfloat16 once, grad_out as it came
                grad_v = _rounded(kept, v.dtype, inv_sum_, rounding).transpose(-1, -2) @ _piece(grad_out, batch, heads, rows)
            else:
                grad_v = kept.transpose(-1, -2) @ _piece(grad_out_p, batch, heads, rows)
            grad_e = torch.matmul(_piece(grad_out_ln2, batch, heads, rows), _piece(v_, batch, heads).transpose(-1, -2),
                                  out=_buffer_for(buffers[1], e.shape))
            if dropped is not None:
                grad_e = grad_e.mul_(dropped) if plain else grad_e * dropped
            if low:
                delta_ = (torch.linalg.vecdot(e, grad_e).unsqueeze(-1) - _piece(grad_log_sum, batch, heads, rows)) * inv_sum_
            else:
                delta_ = _piece(delta, batch, heads, rows)
            grad_logits = grad_e.sub_(delta_).mul_(e) if plain else e * (grad_e - delta_)
            grad_q = grad_logits @ _piece(k, batch, heads)
            grads = (grad_q, grad_logits.transpose(-1, -2) @ _piece(q, batch, heads, rows), grad_v)
            if bias_grad:
                grads += (grad_logits.sum_to_size(_piece(bias, batch, heads, rows).shape),)
            return grads

        summed = ((), (2,), (2,)) + ((tuple(d for d in range(3) if bias.shape[d] == 1),) if bias_grad else ())
        def into():  # dv in float32 too: it is summed over the row chunks
            grads = (torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v_))
            return grads + ((torch.zeros_like(bias),) if bias_grad else ())

        grad_q, grad_k, grad_v, *grad_bias = _over_chunks(shape, chunk, summed, into if plain else None)
        return grad_q, grad_k, grad_v.to(v.dtype), grad_bias[0] if bias_grad else None, None, None, None, None

    @staticmethod
    def jvp(ctx, q_t, k_t, v_t, bias_t, *_):
        saved = ctx.saved_tensors
        q, k, v, _, _, out, _, log_sum = saved
        inv_sum = torch.exp2(-log_sum)
        # The logits' tangent in natural units (ln2 * base-2): ln2 goes on the Nq x D tangents.
        q_t, k_t = ((torch.zeros_like(t) if t_t is None else t_t * LN2) for t, t_t in ((q, q_t), (k, k_t)))
        v = v.to(q.dtype)
        v_t = torch.zeros_like(v) if v_t is None else v_t.to(q.dtype)

        def chunk(batch, heads, rows, index):
            e, dropped = _exp_logits(saved, ctx.settings, batch, heads, rows, index, None)
            weights = e * _piece(inv_sum, batch, heads, rows)
            k_, k_t_ = _piece(k, batch, heads), _piece(k_t, batch, heads)
            logits_t = _piece(q_t, batch, heads, rows) @ k_.transpose(-1, -2) + _piece(q, batch, heads, rows) @ k_t_.transpose(-1, -2)
            if bias_t is not None:  # the bias is in base 2
                logits_t = logits_t + _piece(bias_t, batch, heads, rows) * LN2
            mean_t = (weights * logits_t).sum(-1, keepdim=True)
            weights_t = weights * (logits_t - mean_t)
            if dropped is not None:
                weights, weights_t = weights * dropped, weights_t * dropped
            return weights_t @ _piece(v, batch, heads) + weights @ _piece(v_t, batch, heads), mean_t * LOG2E

        out_t, log_sum_t = _over_chunks((*q.shape[:3], k.shape[2]), chunk, ((), ()))
        return out_t.to(out.dtype), None, log_sum_t


def _forward(q, k, v, bias, mask, is_causal: bool, dropout_p: float, seed: int | None) -> tuple:
    """The forward, a chunk at a time: (out, row max, log2 of the row sum); see ``_ChunkedAttention``.

    Also run as it is, outside the Function: then autograd (or torch.compile) follows its ops.
    """
    shape = (*q.shape[:3], k.shape[2])
    plain = _plain((q, k, v, bias, mask))
    low = plain and v.dtype != q.dtype  # a bfloat16 v: see _ChunkedAttention
    v_ = v if low else v.to(q.dtype)
    buffer = _scratch(shape, q) if plain else None
    rounding = _scratch(shape, v) if low else None

    def chunk(batch, heads, rows, index):
        logits = _logits(_piece(q, batch, heads, rows), _piece(k, batch, heads), _piece(bias, batch, heads, rows),
                         _piece(mask, batch, heads, rows), is_causal, rows, buffer)  # (b, h, rows, Nk)
        row_max = logits.detach().amax(-1, keepdim=True)  # a constant to autograd, as in safe_softmax
        if bias is not None or mask is not None:  # a row may have no key left: exp2(-inf - 0) = 0
            row_max = row_max.masked_fill_(row_max == float("-inf"), 0.0)
        weights = logits.sub_(row_max).exp2_()
        row_sum = weights.sum(-1, keepdim=True)
        if dropout_p > 0.0:
            keep = _keep_mask(seed, index, weights.shape, dropout_p, q.device)
            weights = weights.mul_(keep) if plain else weights * keep
        if low:  # normalised, rounded to bfloat16 once; p v is then the output, rounded once
            divisor = row_sum.masked_fill(row_sum == 0, 1.0) * (1.0 - dropout_p)
            weights = _rounded(weights, v.dtype, divisor.reciprocal(), rounding)
        return weights @ _piece(v_, batch, heads), row_max, row_sum

    def into():
        return v_.new_empty(*shape[:3], v.shape[-1]), q.new_empty(*shape[:3], 1), q.new_empty(*shape[:3], 1)

    out, row_max, row_sum = _over_chunks(shape, chunk, ((), (), ()), into if plain else None)
    row_sum = row_sum.masked_fill_(row_sum == 0, 1.0)  # a row with no key: its output 0 / 1, not 0 / 0
    if low:
        return out, row_max, row_sum.log2()
    # Normalised after p v, all chunks at once: Nq x Dv divisions, not Nq x Nk.
    divisor = row_sum * (1.0 - dropout_p) if dropout_p > 0.0 else row_sum
    return out.div_(divisor) if plain else out / divisor, row_max, row_sum.log2()


def _exp_logits(saved, settings, batch, heads, rows, index, buffer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A chunk's exp2(logit - row max) made again, and its dropout multiplier keep / (1 - p) or None,
    from the saved tensors and settings of ``_ChunkedAttention``."""
    q, k, _, bias, mask, _, row_max, _ = saved
    is_causal, dropout_p, seed = settings
    logits = _logits(_piece(q, batch, heads, rows), _piece(k, batch, heads), _piece(bias, batch, heads, rows),
                     _piece(mask, batch, heads, rows), is_causal, rows, buffer)
    e = logits.sub_(_piece(row_max, batch, heads, rows)).exp2_()
    if dropout_p == 0.0:
        return e, None
    return e, _keep_mask(seed, index, e.shape, dropout_p, q.device).to(e.dtype).div_(1.0 - dropout_p)


def attention_fallback(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    *,
    is_causal: bool = False,
    return_dropout_mask: bool = False,
):
    """``attention_reference``'s attention in bounded memory: what ``backend="einsum"`` runs, on any device.

    Same arguments and meaning (inputs as checked by ``kernels.dispatch.attention``). float16 and
    bfloat16 are computed in float32 (logits, softmax; float16 p v too) and the output cast to v's
    dtype; bfloat16 weights meet v in bfloat16, as in SDPA's CPU kernel (see ``_ChunkedAttention``).
    A finite float mask never masks a key, however negative (see ``_base2_bias``). The
    scores are made CHUNK_ELEMENTS at a time, and the backward makes them again from the saved
    row log-sum-exp, so neither pass holds a (B, H, Nq, Nk) matrix. Backward, double backward,
    forward mode (``torch.func.jvp``, ``torch.autograd.forward_ad``), ``torch.func.grad``/``vjp``
    and ``vmap`` all work. Dropout draws one seed per call from torch's default generator
    (``torch.manual_seed`` repeats it) and each chunk's keep mask from (seed, chunk); the backward
    draws the same. ``return_dropout_mask=True`` returns ``(out, keep)``, ``keep`` the bool
    (B, H, Nq, Nk) mask of the weights kept, for tests. Under ``torch.compile`` (``fullgraph=True``
    works) the chunks' ops are traced as they are: autograd then keeps each chunk's weights for the
    backward, and dropout draws from the default generator (``return_dropout_mask`` does not apply).
    """
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bias = None
    if mask is not None:
        mask = mask[(None,) * (4 - mask.dim())]  # (B or 1, H or 1, Nq or 1, Nk or 1)
        if mask.is_floating_point():
            bias, mask = _base2_bias(mask.to(compute)), None
    compiling = torch.compiler.is_compiling()
    seed = None if compiling or dropout_p == 0.0 else int(torch.randint(2**62, ()))
    # The scale (and base 2) goes on q: an Nq x D multiply, not Nq x Nk. q, k, v are not copied:
    # a chunk of one batch element is a batch of matrices the matmuls read through any strides.
    out_dtype = v.dtype
    q, k = q.to(compute) * (scale * LOG2E), k.to(compute)
    v = v if v.dtype == torch.bfloat16 else v.to(compute)
    arguments = (q, k, v, bias, mask, is_causal, float(dropout_p), seed)
    if compiling:
        # Dynamo traces no autograd.Function with a jvp and makes no torch.Generator: it traces the
        # chunks' ops, and autograd keeps what they need for the backward (each chunk's weights).
        out = _forward(*arguments)[0]
    elif _recorded((q, k, v, bias)):
        out = _ChunkedAttention.apply(*arguments)[0]
    else:  # nothing to differentiate: the forward alone, without the autograd.Function's call overhead
        with torch.no_grad():
            out = _forward(*arguments)[0]
    out = out.to(out_dtype)
    if not return_dropout_mask:
        return out

    def keep(batch, heads, rows, index):
        shape = (*_piece(q, batch, heads, rows).shape[:3], k.shape[2])
        if dropout_p == 0.0:
            return (torch.ones(shape, dtype=torch.bool, device=q.device),)
        return (_keep_mask(seed, index, shape, dropout_p, q.device),)

    return out, _over_chunks((*q.shape[:3], k.shape[2]), keep, ((),))[0]
