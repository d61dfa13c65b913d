"""The forwards ``kernels.swap`` installs, and the checks that say when it may.

Each swap target of ``kernels.swap.TARGETS`` names two functions of this file: ``*_problem(site)``,
why the kernels cannot compute that module exactly (None when they can), and ``*_patch(site)``,
the instance attributes to set (``{module: {name: value}}``, usually one ``forward``). A patched
forward is the library's own forward with its attention, or its patch projection, through
``kernels.attention`` / ``kernels.attention_varlen`` / ``kernels.patch_embed``: the model's own
preprocessing (RoPE, q/k norms, relative-position biases, windows) stays as the model wrote it.

Two ways in, besides forwards written out here:
  * ``redirected(forward)``: the library's forward function itself, run with globals in which
    ``torch.nn.functional.scaled_dot_product_attention`` is ours. For the many timm modules whose
    fused path is one SDPA call after their own preprocessing, this is exactly their forward.
  * transformers' ``AttentionInterface``: models whose attention layers read
    ``config._attn_implementation`` switch it to "vitriton" (``transformers_attention``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import sys
import types
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from kernels import dispatch
from kernels.checks import MAX_HEAD_DIM, MIN_HEAD_DIM

HF_ATTENTION_NAME = "vitriton"
RECORD = "_vitriton_swap"  # the attribute that holds a swapped module's undo record
ATTN_IMPLEMENTATION = "attn_implementation"  # a "patch" that is a call to set_attn_implementation


@dataclasses.dataclass
class Site:
    """A module found by the walk: where it is, what it is, the class it matched, the walk."""

    path: str
    module: nn.Module
    cls: type
    walk: object


# ---------------------------------------------------------------------------------------------
# Binding and the common checks.


class BoundForward:
    """``function`` bound to ``module`` through a weak reference, set as ``module.forward``.

    A strong reference (a bound method, ``functools.partial``) stored in the module's own
    ``__dict__`` would be a reference cycle: ``del model`` would keep every parameter alive until
    the garbage collector runs. Deep copies bind the copy (found in deepcopy's memo); pickles
    store (function, module) and bind again on load; dynamo inlines the call.
    """

    def __init__(self, function, module: nn.Module):
        self.function = function
        self.module_ref = weakref.ref(module)
        functools.update_wrapper(self, function)

    def __call__(self, *args, **kwargs):
        return self.function(self.module_ref(), *args, **kwargs)

    def __deepcopy__(self, memo):
        module = self.module_ref()
        return BoundForward(self.function, memo.get(id(module), module))

    def __reduce__(self):
        redirects = getattr(self.function, "__vitriton_redirects__", None)
        if redirects is not None:  # a function made at run time pickles as the one it copies
            return _bound_redirected, (*redirects, self.module_ref())
        return BoundForward, (self.function, self.module_ref())


def bound(function, module: nn.Module) -> BoundForward:
    return BoundForward(function, module)


def _bound_redirected(original, extra: tuple, module: nn.Module) -> BoundForward:
    return BoundForward(redirected(original, extra), module)


def head_dim_problem(head_dim: int) -> str | None:
    """The kernels' own limit, checked at swap time so a swapped model never falls back later."""
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return f"head dim {head_dim}: the Triton kernels take {MIN_HEAD_DIM} to {MAX_HEAD_DIM}"
    return None


def patched_elsewhere(*modules: nn.Module) -> str | None:
    for module in modules:
        if "forward" in module.__dict__:
            return f"{type(module).__name__}.forward is already patched on this instance by something else"
    return None


def overrides(module: nn.Module, cls: type, *names: str) -> str | None:
    """A subclass that overrides what the patch replaces computes something else: leave it."""
    for name in names or ("forward",):
        if getattr(type(module), name, None) is not getattr(cls, name, None):
            return f"{type(module).__name__} overrides {cls.__name__}.{name}"
    return None


def is_patch_conv(conv: nn.Module) -> str | None:
    """None if ``conv`` is what kernels.patch_embed computes: a square, stride-P, unpadded Conv2d."""
    if type(conv) is not nn.Conv2d:
        return f"the projection is a {type(conv).__name__}, not one stride-P nn.Conv2d"
    k, s = conv.kernel_size, conv.stride
    if k[0] != k[1] or tuple(s) != tuple(k) or tuple(conv.padding) != (0, 0) or tuple(conv.dilation) != (1, 1) or conv.groups != 1:
        return (
            f"the projection is not a square, unpadded Conv2d with stride = kernel "
            f"(kernel {tuple(k)}, stride {tuple(s)}, padding {conv.padding}, groups {conv.groups})"
        )
    return None


def _module_head_dim(module: nn.Module) -> int | None:
    for name in ("head_dim", "attention_head_size", "dim_head", "key_dim"):
        value = getattr(module, name, None)
        if isinstance(value, int):
            return value
    return None


# ---------------------------------------------------------------------------------------------
# The library's own forward with SDPA through our kernels.


def _sdpa_through_kernels(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` as the redirected forwards see it (looked up per call,
    so ``kernels.use_backend`` and test spies on ``dispatch`` apply)."""
    return dispatch.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _copy_module(module: types.ModuleType, **replaced) -> types.ModuleType:
    copy = types.ModuleType(module.__name__, module.__doc__)
    copy.__dict__.update(vars(module))
    copy.__dict__.update(replaced)
    return copy


@functools.cache
def _namespaces() -> tuple[types.ModuleType, types.ModuleType]:
    """(torch.nn.functional, torch) as seen by a redirected forward: theirs, but for SDPA."""
    functional = _copy_module(F, scaled_dot_product_attention=_sdpa_through_kernels)
    torch_copy = _copy_module(torch, nn=_copy_module(torch.nn, functional=functional))
    return functional, torch_copy


def sdpa_aliases(function) -> dict[str, types.ModuleType] | None:
    """The global names through which ``function`` reaches SDPA, each with its replacement, or None."""
    code = getattr(function, "__code__", None)
    if code is None or "scaled_dot_product_attention" not in code.co_names:
        return None
    functional, torch_copy = _namespaces()
    aliases = {}
    for name in code.co_names:
        value = function.__globals__.get(name)
        if value is F:
            aliases[name] = functional
        elif value is torch and "nn" in code.co_names and "functional" in code.co_names:
            aliases[name] = torch_copy
    return aliases or None


@functools.cache
def redirected(function, extra: tuple = ()):
    """A copy of ``function`` whose ``F.scaled_dot_product_attention`` (or
    ``torch.nn.functional.scaled_dot_product_attention``) calls ``kernels`` instead; ``extra``:
    more (global name, replacement) pairs, for a library helper written out here."""
    namespace = {**function.__globals__, **(sdpa_aliases(function) or {}), **dict(extra)}
    copy = types.FunctionType(function.__code__, namespace, function.__name__, function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__, copy.__doc__ = function.__qualname__, function.__doc__
    copy.__vitriton_redirects__ = (function, extra)
    return copy


def sdpa_redirect_problem(site: Site) -> str | None:
    module, cls = site.module, site.cls
    function = inspect.unwrap(cls.forward)
    if function is not cls.forward:
        return f"{cls.__name__}.forward is wrapped by a decorator, so its SDPA call cannot be redirected"
    if sdpa_aliases(function) is None:
        return f"{cls.__name__}.forward makes no F.scaled_dot_product_attention call of its own"
    head_dim = _module_head_dim(module)
    return (
        overrides(module, cls)
        or (head_dim_problem(head_dim) if head_dim is not None else None)
        or patched_elsewhere(module)
    )


def sdpa_redirect_patch(site: Site) -> dict:
    values = {"forward": bound(redirected(site.cls.forward), site.module)}
    if hasattr(site.module, "fused_attn"):
        values["fused_attn"] = True  # the branch of the forward that makes the SDPA call
    return {site.module: values}


# ---------------------------------------------------------------------------------------------
# timm: Attention, and PatchEmbed with its VisionTransformer.

TIMM_ATTENTION_ARGUMENTS = ("self", "x", "attn_mask", "is_causal")


def timm_attention_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """timm 1.0's ``Attention.forward``, with the attention itself through ``kernels.attention``.

    Same signature and meaning: ``attn_mask`` bool (True = may attend) or float (added), as for
    SDPA, which timm calls; ``is_causal`` together with a mask is an error, as there.
    """
    B, N, _ = x.shape
    gate = getattr(self, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, D)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) each: strided views, no copy
    q, k = self.q_norm(q), self.k_norm(k)
    if is_causal and attn_mask is not None:
        raise ValueError("timm Attention (vitriton): expected either attn_mask or is_causal=True, got both")
    x = dispatch.attention(
        q, k, v, attn_mask,
        scale=self.scale,
        dropout_p=self.attn_drop.p if self.training else 0.0,
        is_causal=is_causal,
    )  # (B, H, N, D)
    x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)  # (B, N, H * D)
    norm = getattr(self, "norm", None)  # scale_norm; older timm has none
    if norm is not None:
        x = norm(x)
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def timm_attention_problem(site: Site) -> str | None:
    module, cls = site.module, site.cls
    arguments = tuple(inspect.signature(cls.forward).parameters)
    if arguments != TIMM_ATTENTION_ARGUMENTS[: len(arguments)]:
        return f"this timm's Attention.forward takes {arguments}; swap knows {TIMM_ATTENTION_ARGUMENTS}"
    for name in ("qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop", "num_heads", "head_dim", "scale"):
        if not hasattr(module, name):
            return f"this timm's Attention has no {name!r}"
    return overrides(module, cls) or head_dim_problem(module.head_dim) or patched_elsewhere(module)


def timm_attention_patch(site: Site) -> dict:
    return {site.module: {"forward": bound(timm_attention_forward, site.module)}}


def _timm_prefix_tokens(vit: nn.Module) -> torch.Tensor | None:
    """The tokens timm puts before the patches, (1, T, D), in its order (class, distillation,
    register), or None."""
    names = ("cls_token", "dist_token", "reg_token")
    tokens = [t for t in (getattr(vit, name, None) for name in names) if t is not None]
    return torch.cat(tokens, dim=1) if len(tokens) > 1 else (tokens[0] if tokens else None)


def timm_vit_patch_embed_forward(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``vit.patch_embed(x)`` followed by the prefix token and position part of ``vit._pos_embed``.

    Installed as ``vit.patch_embed.forward``, while ``vit._pos_embed`` keeps only its ``pos_drop``:
    every path through the model (``forward_features``, ``forward_intermediates``) calls the two
    in sequence, so the model computes what it did. ``vit.patch_embed(x)`` alone now returns the
    tokens with prefix tokens and positions.
    """
    patch_embed = vit.patch_embed
    B, _, height, width = x.shape
    torch._assert(height == patch_embed.img_size[0], f"Input height ({height}) doesn't match model ({patch_embed.img_size[0]}).")
    torch._assert(width == patch_embed.img_size[1], f"Input width ({width}) doesn't match model ({patch_embed.img_size[1]}).")
    pos_embed = vit.pos_embed  # (1, [T +] N, D) or None
    prefix = _timm_prefix_tokens(vit)  # (1, T, D) or None
    n_prefix = 0 if prefix is None else prefix.shape[1]
    weight, bias = patch_embed.proj.weight, patch_embed.proj.bias
    plain = isinstance(patch_embed.norm, nn.Identity)
    if plain:  # one kernel call: projection, prefix tokens (class, distillation, registers), positions
        if pos_embed is not None and vit.no_embed_class and prefix is not None:
            # no_embed_class: timm adds the positions to the patches only, then prepends the prefix
            # tokens. A zero row for each is the same sum, exactly (c + 0 == c).
            pos_embed = torch.cat([pos_embed.new_zeros(1, n_prefix, pos_embed.shape[-1]), pos_embed], dim=1)
        return dispatch.patch_embed(x, weight, bias, prefix, pos_embed)
    # A norm between the projection and the prefix (embed_norm_layer): the kernel projects the
    # patches, the rest is timm's, in order.
    if pos_embed is not None and not vit.no_embed_class and n_prefix:
        prefix, pos_embed = prefix + pos_embed[:, :n_prefix], pos_embed[:, n_prefix:]
    patches = patch_embed.norm(dispatch.patch_embed(x, weight, bias))  # (B, N, D)
    patches = patches if pos_embed is None else patches + pos_embed
    return patches if prefix is None else torch.cat([prefix.expand(B, -1, -1), patches], dim=1)  # (B, T + N, D)


def _timm_vit_pos_drop_only(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``vit._pos_embed`` once the patch embedding has added the class token and positions."""
    return vit.pos_drop(x)


def timm_vit_patch_embed_problem(site: Site) -> str | None:
    vit = site.module
    patch_embed = vit.patch_embed
    patch_embed_class = getattr(sys.modules.get("timm.layers.patch_embed"), "PatchEmbed", None)
    if patch_embed_class is None or not isinstance(patch_embed, patch_embed_class):
        return f"its patch_embed is a {type(patch_embed).__name__}, not timm's PatchEmbed"
    distilled = getattr(sys.modules.get("timm.models.deit"), "VisionTransformerDistilled", None)
    if distilled is not None and type(vit)._pos_embed is distilled._pos_embed:
        base = distilled  # class + distillation token, then the positions: timm's order, as above
    else:
        base = site.cls
    problem = overrides(patch_embed, patch_embed_class) or overrides(vit, base, "_pos_embed", "forward_features", "forward_intermediates")
    if problem:
        return problem
    if "_pos_embed" in vit.__dict__:
        return "VisionTransformer._pos_embed is already patched on this instance by something else"
    if vit.dynamic_img_size:
        return "dynamic_img_size=True: the position embedding is resampled for each input size"
    if patch_embed.img_size is None or not patch_embed.strict_img_size or patch_embed.dynamic_img_pad:
        return "the patch embedding takes images of any size (strict_img_size=False or dynamic_img_pad)"
    if not patch_embed.flatten:
        return f"output_fmt={patch_embed.output_fmt}: the patch embedding does not flatten to (B, N, D)"
    return is_patch_conv(patch_embed.proj) or patched_elsewhere(patch_embed)


def timm_vit_patch_embed_patch(site: Site) -> dict:
    vit = site.module
    return {
        vit.patch_embed: {"forward": bound(timm_vit_patch_embed_forward, vit)},
        vit: {"_pos_embed": bound(_timm_vit_pos_drop_only, vit)},
    }


def timm_patch_embed_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm ``PatchEmbed.forward`` (fixed image size) with the projection through ``kernels.patch_embed``."""
    B, _, height, width = x.shape
    torch._assert(height == self.img_size[0], f"Input height ({height}) doesn't match model ({self.img_size[0]}).")
    torch._assert(width == self.img_size[1], f"Input width ({width}) doesn't match model ({self.img_size[1]}).")
    x = dispatch.patch_embed(x, self.proj.weight, self.proj.bias)  # (B, N, D)
    if not self.flatten:  # the same tokens, viewed on their grid
        x = x.view(B, *self.grid_size, x.shape[-1])  # (B, H/P, W/P, D): NHWC
        if str(self.output_fmt) in ("NCHW", "Format.NCHW"):
            x = x.permute(0, 3, 1, 2)  # (B, D, H/P, W/P): NCHW, a view in channels-last memory
    return self.norm(x)


def timm_patch_embed_problem(site: Site) -> str | None:
    patch_embed = site.module
    if patch_embed.img_size is None or not patch_embed.strict_img_size or patch_embed.dynamic_img_pad:
        return "the patch embedding takes images of any size (strict_img_size=False or dynamic_img_pad)"
    if not patch_embed.flatten and str(patch_embed.output_fmt) not in ("NHWC", "Format.NHWC", "NCHW", "Format.NCHW"):
        return f"output_fmt={patch_embed.output_fmt}: kernels.patch_embed returns tokens (B, N, D), viewed as NHWC or NCHW"
    return overrides(patch_embed, site.cls) or is_patch_conv(patch_embed.proj) or patched_elsewhere(patch_embed)


def timm_patch_embed_patch(site: Site) -> dict:
    return {site.module: {"forward": bound(timm_patch_embed_forward, site.module)}}


# ---------------------------------------------------------------------------------------------
# torch.nn.MultiheadAttention, nn.TransformerEncoderLayer, torchvision's VisionTransformer.


def _mha_mask(self, attn_mask, key_padding_mask, batch, n_q, n_k, dtype):
    """nn.MultiheadAttention's masks (bool True = may NOT attend, or float added; attn_mask
    (Nq, Nk) or (B * H, Nq, Nk), key_padding_mask (B, Nk)) as one kernels mask (True = may attend)."""
    masks = []
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dim() == 2 else attn_mask.view(batch, self.num_heads, n_q, n_k)
        masks.append(~mask if mask.dtype == torch.bool else mask)
    if key_padding_mask is not None:
        mask = key_padding_mask.view(batch, 1, 1, n_k)
        masks.append(~mask if mask.dtype == torch.bool else mask)
    if len(masks) < 2:
        return masks[0] if masks else None
    as_float = [m if m.is_floating_point() else torch.zeros((), dtype=dtype, device=m.device).masked_fill(~m, -torch.inf) for m in masks]
    return as_float[0] + as_float[1]


def multihead_attention_through_kernel(self, query, key, value, key_padding_mask=None, attn_mask=None, is_causal=False):
    """The attention of ``nn.MultiheadAttention`` (batched input), output only: (out, None)."""
    x_q = query if self.batch_first else query.transpose(0, 1)  # (B, Nq, E)
    B, n_q, E = x_q.shape
    H, D = self.num_heads, self.head_dim
    if query is key and key is value and self._qkv_same_embed_dim:
        qkv = F.linear(x_q, self.in_proj_weight, self.in_proj_bias).view(B, n_q, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) each: strided views, no copy
        n_k = n_q
    else:
        x_k = key if self.batch_first else key.transpose(0, 1)  # (B, Nk, Ek)
        x_v = value if self.batch_first else value.transpose(0, 1)
        n_k = x_k.shape[1]
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(x_q, w_q, b_q).view(B, n_q, H, D).transpose(1, 2)  # (B, H, Nq, D)
        k = F.linear(x_k, w_k, b_k).view(B, n_k, H, D).transpose(1, 2)  # (B, H, Nk, D)
        v = F.linear(x_v, w_v, b_v).view(B, n_k, H, D).transpose(1, 2)
    mask = _mha_mask(self, attn_mask, key_padding_mask, B, n_q, n_k, q.dtype)
    out = dispatch.attention(
        q, k, v, mask, dropout_p=self.dropout if self.training else 0.0, is_causal=bool(is_causal and mask is None)
    )  # (B, H, Nq, D)
    out = F.linear(out.transpose(1, 2).reshape(B, n_q, E), self.out_proj.weight, self.out_proj.bias)  # (B, Nq, E)
    return (out if self.batch_first else out.transpose(0, 1)), None


def multihead_attention_forward(
    self,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
):
    """``nn.MultiheadAttention.forward`` through the kernel: self- or cross-attention, with masks.

    torchvision's EncoderBlock calls ``attn(x, x, x, need_weights=False)``. Calls that ask for
    the attention weights (``need_weights=True``, PyTorch's default) or pass unbatched input run
    the original forward, so the module's meaning never changes.
    """
    if need_weights or query.dim() != 3:
        return type(self).forward(
            self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
    return multihead_attention_through_kernel(self, query, key, value, key_padding_mask, attn_mask, is_causal)


def multihead_attention_problem(site: Site) -> str | None:
    module = site.module
    if module.bias_k is not None or module.add_zero_attn:
        return "add_bias_kv or add_zero_attn: extra key/value rows the kernel does not add"
    return overrides(module, nn.MultiheadAttention) or head_dim_problem(module.head_dim) or patched_elsewhere(module)


def multihead_attention_patch(site: Site) -> dict:
    return {site.module: {"forward": bound(multihead_attention_forward, site.module)}}


def transformer_encoder_layer_problem(site: Site) -> str | None:
    layer = site.module
    problem = overrides(layer, nn.TransformerEncoderLayer, "forward", "_sa_block")
    return problem or multihead_attention_problem(Site(f"{site.path}.self_attn", layer.self_attn, nn.MultiheadAttention, site.walk))


def transformer_encoder_layer_patch(site: Site) -> dict:
    layer = site.module
    # In eval under no_grad, nn.TransformerEncoderLayer runs PyTorch's fused fast path and never
    # calls self_attn. That path is refused when activation_relu_or_gelu is false: the layer
    # then calls _sa_block (self_attn with need_weights=False) and its activation, as always.
    return {
        layer.self_attn: {"forward": bound(multihead_attention_forward, layer.self_attn)},
        layer: {"activation_relu_or_gelu": False},
    }


def torchvision_vit_forward(self, x: torch.Tensor) -> torch.Tensor:
    """torchvision ``VisionTransformer.forward`` with conv_proj, class token and positions fused.

    The encoder's own ``pos_embedding`` addition moved into ``kernels.patch_embed``; its forward
    (patched alongside) keeps the dropout, the layers and the final norm, in the same order.
    """
    _, _, height, width = x.shape
    torch._assert(height == self.image_size, f"Wrong image height! Expected {self.image_size} but got {height}!")
    torch._assert(width == self.image_size, f"Wrong image width! Expected {self.image_size} but got {width}!")
    tokens = dispatch.patch_embed(
        x, self.conv_proj.weight, self.conv_proj.bias, self.class_token, self.encoder.pos_embedding
    )  # (B, 1 + N, D)
    x = self.encoder(tokens)
    return self.heads(x[:, 0])  # the class token


def _torchvision_encoder_forward(self, input: torch.Tensor) -> torch.Tensor:
    """torchvision ``Encoder.forward`` for tokens that already carry their position embedding."""
    torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
    return self.ln(self.layers(self.dropout(input)))


def torchvision_vit_problem(site: Site) -> str | None:
    vit, cls = site.module, site.cls
    encoder_class = sys.modules[cls.__module__].Encoder
    problem = overrides(vit, cls, "forward", "_process_input") or overrides(vit.encoder, encoder_class)
    if problem:
        return problem
    if not isinstance(vit.conv_proj, nn.Conv2d):
        return "conv_stem_configs: a convolutional stem, not one stride-P projection"
    return is_patch_conv(vit.conv_proj) or patched_elsewhere(vit, vit.encoder)


def torchvision_vit_patch(site: Site) -> dict:
    vit = site.module
    return {
        vit: {"forward": bound(torchvision_vit_forward, vit)},
        vit.encoder: {"forward": bound(_torchvision_encoder_forward, vit.encoder)},
    }


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers: attention layers through the attention interface ("vitriton").


def _attention_weights_wanted(kwargs: dict) -> bool:
    """Whether this call must return attention weights: ``output_attentions=True`` reaches the
    interface as a keyword, or through transformers' output collector (its hooks drop None)."""
    if kwargs.get("output_attentions"):
        return True
    capturing = sys.modules.get("transformers.utils.output_capturing")
    collector = getattr(capturing, "_active_collector", None)
    collected = collector.get() if collector is not None else None
    return bool(collected) and "attentions" in collected


def transformers_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-interface function ("vitriton"), as ``sdpa_attention_forward``.

    query (B, H, Nq, D), key/value (B, H_kv, Nk, D); ``attention_mask`` None, bool (True = may
    attend, what the "vitriton" mask interface, ``sdpa_mask``, builds) or float (added).
    Returns the output as (B, Nq, H, D) and no attention weights, as SDPA's does; a call that
    asks for the weights (``output_attentions=True``) runs the model's own eager attention.
    """
    for name in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='{HF_ATTENTION_NAME}': expected no {name}, got one; use 'eager' or 'sdpa'")
    if _attention_weights_wanted(kwargs):
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            if attention_mask is not None and attention_mask.dtype == torch.bool:
                # eager adds its mask: True = may attend becomes 0, False the dtype's minimum
                attention_mask = torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(
                    ~attention_mask, torch.finfo(query.dtype).min
                )
            return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    # Grouped-query attention (fewer key/value heads) as SDPA's enable_gqa: the drop-in handles it.
    out = dispatch.scaled_dot_product_attention(
        query, key, value, attention_mask, dropout, is_causal, scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None  # (B, Nq, H, D)


@functools.cache
def _class_reads_attention_interface(cls: type) -> bool:
    code = getattr(inspect.unwrap(cls.forward), "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def reads_attention_interface(module: nn.Module) -> bool:
    """An attention layer whose forward picks ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``."""
    return hasattr(module, "config") and _class_reads_attention_interface(type(module))


def _configs_reached(model: nn.Module) -> list:
    """The configs ``model.set_attn_implementation`` sets: its own, its sub-configs at any depth,
    and those of the PreTrainedModels inside it."""
    pretrained = sys.modules["transformers"].PreTrainedModel
    found, todo = [], [model.config] + [m.config for m in model.modules() if isinstance(m, pretrained)]
    while todo:
        config = todo.pop()
        if any(config is seen for seen in found):
            continue
        found.append(config)
        todo.extend(c for c in (getattr(config, key, None) for key in getattr(config, "sub_configs", {})) if c is not None)
    return found


def interface_attention_problem(site: Site) -> str | None:
    layer = site.module
    top_path, top = site.walk.top_pretrained(site.path)
    if top is None:
        return "not inside a transformers PreTrainedModel, whose attention implementation is what swap switches"
    if not getattr(type(top), "_can_set_attn_implementation", lambda: True)():
        return f"{type(top).__name__} cannot set its attention implementation after it is built"
    if not any(layer.config is config for config in _configs_reached(top)):
        return f"its config is not one that {type(top).__name__}.set_attn_implementation reaches"
    return site.walk.interface_model_problem(top_path)


def interface_attention_patch(site: Site) -> dict:
    _, top = site.walk.top_pretrained(site.path)
    return {top: {ATTN_IMPLEMENTATION: HF_ATTENTION_NAME}}


def interface_attention_already(site: Site) -> str | None:
    if site.module.config._attn_implementation != HF_ATTENTION_NAME:
        return None
    _, top = site.walk.top_pretrained(site.path)
    record = top.__dict__.get(RECORD)
    if record is not None and record.token is site.walk.token:
        return None  # switched a moment ago by this swap, for an earlier layer
    return f"attn_implementation is already '{HF_ATTENTION_NAME}'"


def interface_layer_problem(layer: nn.Module) -> str | None:
    """What the "vitriton" interface function cannot compute for this layer (it would raise)."""
    head_dim = _module_head_dim(layer)
    if head_dim is not None and head_dim_problem(head_dim):
        return head_dim_problem(head_dim)
    if getattr(layer.config, "attn_logit_softcapping", None) is not None:
        return f"{type(layer).__name__} caps its logits (attn_logit_softcapping), which the kernels do not"
    if getattr(layer, "sinks", None) is not None:
        return f"{type(layer).__name__} has attention sinks, which the kernels do not add"
    return None


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers: modules that bypass the interface.


def vit_embeddings_forward(
    self,
    pixel_values: torch.Tensor,
    bool_masked_pos: torch.Tensor | None = None,
    interpolate_pos_encoding: bool | None = False,
) -> torch.Tensor:
    """transformers ``ViTEmbeddings.forward``: projection, [CLS] and positions in one kernel call.

    Masked patches (``bool_masked_pos``) and resampled positions (``interpolate_pos_encoding``)
    run the original forward.
    """
    if bool_masked_pos is not None or interpolate_pos_encoding:
        return type(self).forward(self, pixel_values, bool_masked_pos, interpolate_pos_encoding)
    _, channels, height, width = pixel_values.shape
    patches = self.patch_embeddings
    if channels != patches.num_channels:
        raise ValueError(
            "Make sure that the channel dimension of the pixel values match with the one set in the configuration."
            f" Expected {patches.num_channels} but got {channels}."
        )
    if height != self.image_size[0] or width != self.image_size[1]:
        raise ValueError(
            f"Input image size ({height}*{width}) doesn't match model ({self.image_size[0]}*{self.image_size[1]})."
        )
    tokens = dispatch.patch_embed(
        pixel_values, patches.projection.weight, patches.projection.bias, self.cls_token, self.position_embeddings
    )  # (B, 1 + N, D)
    return self.dropout(tokens)


def vit_embeddings_problem(site: Site) -> str | None:
    embeddings = site.module
    patches_class = getattr(sys.modules[site.cls.__module__], "ViTPatchEmbeddings", None)
    patches = embeddings.patch_embeddings
    if patches_class is None or type(patches).forward is not patches_class.forward:
        return f"its patch_embeddings ({type(patches).__name__}) is not transformers' ViTPatchEmbeddings"
    return overrides(embeddings, site.cls) or is_patch_conv(patches.projection) or patched_elsewhere(embeddings)


def vit_embeddings_patch(site: Site) -> dict:
    return {site.module: {"forward": bound(vit_embeddings_forward, site.module)}}


def _weightless_multihead_attention_forward(
    self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False
):
    """``nn.MultiheadAttention.forward`` inside an owner that keeps only the output (``[0]``):
    the weights it asks for by default are never read, so none are computed."""
    if query.dim() != 3:
        return type(self).forward(
            self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
    return multihead_attention_through_kernel(self, query, key, value, key_padding_mask, attn_mask, is_causal)


def pooling_head_problem(site: Site) -> str | None:
    """SigLIP / SigLIP2 attention pooling: a learned probe (Nq = 1) attending the tokens through
    an nn.MultiheadAttention whose weights the head's own forward drops (``[0]``)."""
    head = site.module
    attention = head.attention
    problem = overrides(head, site.cls) or overrides(attention, nn.MultiheadAttention)
    if problem:
        return problem
    try:
        source = inspect.getsource(site.cls.forward)
    except (OSError, TypeError):
        return f"the source of {site.cls.__name__}.forward is not available to check that it drops the attention weights"
    if "self.attention(" not in source or ")[0]" not in source:
        return f"{site.cls.__name__}.forward does not drop the attention weights as swap expects"
    return multihead_attention_problem(Site(f"{site.path}.attention", attention, nn.MultiheadAttention, site.walk))


def pooling_head_patch(site: Site) -> dict:
    attention = site.module.attention
    return {attention: {"forward": bound(_weightless_multihead_attention_forward, attention)}}


def _data2vec_vision_self_attention_forward(self, hidden_states, output_attentions=False, *args, **kwargs):
    """Data2VecVision self-attention as its SDPA class computes it, through our kernels; a call
    that asks for the weights (``output_attentions=True``) runs the original (eager) forward."""
    if output_attentions:
        return type(self).forward(self, hidden_states, output_attentions, *args, **kwargs)
    sdpa_class = sys.modules[type(self).__module__].Data2VecVisionSdpaSelfAttention
    return redirected(sdpa_class.forward)(self, hidden_states, False, *args, **kwargs)


def data2vec_vision_problem(site: Site) -> str | None:
    module = site.module
    sdpa_class = getattr(sys.modules[site.cls.__module__], "Data2VecVisionSdpaSelfAttention", None)
    if sdpa_class is None or sdpa_aliases(sdpa_class.forward) is None:
        return "this transformers has no Data2VecVisionSdpaSelfAttention making one SDPA call"
    if type(module) not in (site.cls, sdpa_class):
        return f"{type(module).__name__} is neither Data2VecVision's eager nor its SDPA self-attention"
    return head_dim_problem(module.attention_head_size) or patched_elsewhere(module)


def data2vec_vision_patch(site: Site) -> dict:
    return {site.module: {"forward": bound(_data2vec_vision_self_attention_forward, site.module)}}


# Qwen2-VL / Qwen2.5-VL / Qwen3-VL: one forward (hidden_states (total, E), cu_seqlens,
# position_embeddings (cos, sin), max_seqlen), rotary from their own module.


def qwen_vision_attention_forward(
    self,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision attention: one ``kernels.attention_varlen`` call
    over the packed images (or, in Qwen2.5-VL's windowed layers, windows) instead of one SDPA
    call per image. The rotary embedding is the model's own ``apply_rotary_pos_emb_vision``."""
    seq_length = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).unbind(1)  # (total, H, D) each
    cos, sin = position_embeddings
    q, k = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision(q, k, cos, sin)
    cu_seqlens = cu_seqlens.to(torch.int32)
    longest = max_seqlen if isinstance(max_seqlen, (int, torch.Tensor)) else None  # a 0-d tensor is taken unread
    out = dispatch.attention_varlen(
        q, k, v, cu_seqlens, cu_seqlens, longest, longest,
        scale=self.scaling, dropout_p=self.attention_dropout if self.training else 0.0,
    )  # (total, H, D)
    return self.proj(out.reshape(seq_length, -1))


def qwen_vision_attention_problem(site: Site) -> str | None:
    module = site.module
    if getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb_vision", None) is None:
        return "its module has no apply_rotary_pos_emb_vision to apply the rotary embedding with"
    return overrides(module, site.cls) or head_dim_problem(module.head_dim) or patched_elsewhere(module)


def qwen_vision_attention_patch(site: Site) -> dict:
    return {site.module: {"forward": bound(qwen_vision_attention_forward, site.module)}}


# Pixtral: the vision model packs the images of a batch into one sequence and builds a
# block-diagonal (N, N) mask; swapped, it passes cu_seqlens instead (the keyword names of its own
# flash-attention path), and each attention layer makes one kernels.attention_varlen call.


def _pixtral_vision_forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None, **kwargs):
    """``PixtralVisionModel.forward`` with ``cu_seqlens`` in place of the block-diagonal mask."""
    pixtral = sys.modules[type(self).__module__]
    if image_sizes is None:
        batch_size, _, height, width = pixel_values.shape
        image_sizes = [(height, width)] * batch_size
    patch_embeds = self.patch_conv(pixel_values.to(dtype=self.patch_conv.weight.dtype))
    patch_embeds_list = [
        embed[..., : (size[0] // self.patch_size), : (size[1] // self.patch_size)]
        for embed, size in zip(patch_embeds, image_sizes)
    ]
    patch_embeds = torch.cat([p.flatten(1).T for p in patch_embeds_list], dim=0).unsqueeze(0)  # (1, total, E)
    patch_embeds = self.ln_pre(patch_embeds)
    position_ids = []
    for patch in patch_embeds_list:
        hpos_ids, wpos_ids = torch.meshgrid(
            torch.arange(patch.shape[-2], device=patch.device), torch.arange(patch.shape[-1], device=patch.device), indexing="ij"
        )
        position_ids.append(torch.stack([hpos_ids.flatten(), wpos_ids.flatten()], dim=-1))
    position_embeddings = self.patch_positional_embedding(patch_embeds, torch.cat(position_ids, dim=0))
    lengths = [p.shape[-2] * p.shape[-1] for p in patch_embeds_list]  # from shapes: no host sync
    attention_mask = None
    if _attention_weights_wanted(kwargs):  # the original layers, with the original mask
        attention_mask = pixtral.generate_block_attention_mask(lengths, patch_embeds)
    else:
        cu_seqlens = torch.tensor([0, *lengths], device=patch_embeds.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        kwargs.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max(lengths), max_length_k=max(lengths))
    return self.transformer(patch_embeds, attention_mask=attention_mask, position_embeddings=position_embeddings, **kwargs)


@functools.cache
def _decorated_pixtral_vision_forward():
    """The forward above under the decorators transformers puts on the original (config defaults,
    output capture), so ``output_hidden_states`` and ``return_dict`` behave as they did."""
    from transformers.utils.generic import merge_with_config_defaults
    from transformers.utils.output_capturing import capture_outputs

    return merge_with_config_defaults(capture_outputs(_pixtral_vision_forward))


def pixtral_attention_forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
    """``PixtralAttention.forward``: one ``kernels.attention_varlen`` call over the packed images
    when the (swapped) vision model passes ``cu_seq_lens_q``, else ``kernels.attention`` with the
    given mask; a call that wants the weights runs the original."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if _attention_weights_wanted(kwargs) or (cu_seqlens is None and "cu_seq_lens_q" in kwargs):
        return type(self).forward(self, hidden_states, attention_mask, position_embeddings, **kwargs)
    B, N, _ = hidden_states.shape
    q = self.q_proj(hidden_states).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)
    k = self.k_proj(hidden_states).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
    v = self.v_proj(hidden_states).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = sys.modules[type(self).__module__].apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=0)
    dropout_p = self.dropout if self.training else 0.0
    if cu_seqlens is not None and B == 1:
        q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))  # (total, H, D): the packed layout, views
        longest = kwargs.get("max_length_q")
        out = dispatch.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, longest, longest, scale=self.scaling, dropout_p=dropout_p)
        out = out.reshape(1, N, -1)  # (1, total, H * D)
    else:
        out = dispatch.attention(q, k, v, attention_mask, scale=self.scaling, dropout_p=dropout_p)  # (B, H, N, D)
        out = out.transpose(1, 2).reshape(B, N, -1)
    return self.o_proj(out), None


def pixtral_vision_problem(site: Site) -> str | None:
    model = site.module
    pixtral = sys.modules[site.cls.__module__]
    for name in ("generate_block_attention_mask", "apply_rotary_pos_emb", "PixtralAttention"):
        if not hasattr(pixtral, name):
            return f"this transformers' Pixtral has no {name}"
    if not isinstance(model.patch_conv, nn.Conv2d):
        return "its patch_conv is not an nn.Conv2d"
    # Its layers must all take cu_seqlens: the original attention would ignore them and attend
    # across images once the mask is gone.
    for path, layer in model.named_modules():
        if isinstance(layer, pixtral.PixtralAttention):
            problem = pixtral_attention_problem(Site(path, layer, pixtral.PixtralAttention, site.walk))
            if problem:
                return f"its layer {path} is left alone ({problem}), and would attend across images without the mask"
    return overrides(model, site.cls) or patched_elsewhere(model)


def pixtral_vision_patch(site: Site) -> dict:
    return {site.module: {"forward": bound(_decorated_pixtral_vision_forward(), site.module)}}


def pixtral_attention_problem(site: Site) -> str | None:
    layer = site.module
    return overrides(layer, site.cls) or head_dim_problem(layer.head_dim) or patched_elsewhere(layer)


def pixtral_attention_patch(site: Site) -> dict:
    return {site.module: {"forward": bound(pixtral_attention_forward, site.module)}}



# ---------------------------------------------------------------------------------------------
# Attention written out by its library (no SDPA call): the same preprocessing, then our kernel.


def _as_kernel_bias(bias: torch.Tensor, batch: int) -> torch.Tensor:
    """A per-window bias (W, H, N, N) for a batch of B * W windows, windows fastest, as (B * W, H, N, N)."""
    windows = bias.shape[0]
    return bias.unsqueeze(0).expand(batch // windows, *bias.shape).reshape(batch, *bias.shape[1:])


def timm_swinv2_window_attention_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """timm Swin V2 ``WindowAttention.forward``: cosine attention as our kernel computes it. q and k
    are L2-normalised and the per-head logit scale is folded into q (scale 1); the CPB-MLP bias
    (16 sigmoid) and the shift mask are one float bias; the windows are the batch."""
    B_, N, C = x.shape
    if self.q_bias is None:
        qkv = self.qkv(x)
    else:
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = self.qkv(x) + qkv_bias if self.qkv_bias_separate else F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
    q, k, v = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B_, H, N, D) each
    logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()  # (H, 1, 1)
    q = F.normalize(q, dim=-1) * logit_scale
    k = F.normalize(k, dim=-1)
    table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
    bias = table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)  # (H, N, N)
    bias = 16 * torch.sigmoid(bias).unsqueeze(0)  # (1, H, N, N)
    if mask is not None:
        bias = _as_kernel_bias(bias + mask.unsqueeze(1), B_)  # (B_, H, N, N)
    x = dispatch.attention(q, k, v, bias, scale=1.0, dropout_p=self.attn_drop.p if self.training else 0.0)  # (B_, H, N, D)
    x = x.transpose(1, 2).reshape(B_, N, C)
    return self.proj_drop(self.proj(x))


def timm_swinv2_problem(site: Site) -> str | None:
    module = site.module
    for name in ("logit_scale", "cpb_mlp", "relative_coords_table", "relative_position_index", "q_bias", "qkv_bias_separate"):
        if not hasattr(module, name):
            return f"this timm's Swin V2 WindowAttention has no {name!r}"
    head_dim = module.qkv.out_features // 3 // module.num_heads
    return overrides(module, site.cls) or head_dim_problem(head_dim) or patched_elsewhere(module)


def timm_crossvit_cross_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm CrossViT ``CrossAttention.forward``: the class token (Nq = 1) attends every token."""
    B, N, C = x.shape
    q = self.wq(x[:, 0:1, ...]).reshape(B, 1, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)  # (B, H, 1, D)
    k = self.wk(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)  # (B, H, N, D)
    v = self.wv(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
    x = dispatch.attention(q, k, v, scale=self.scale, dropout_p=self.attn_drop.p if self.training else 0.0)  # (B, H, 1, D)
    x = x.transpose(1, 2).reshape(B, 1, C)
    return self.proj_drop(self.proj(x))


def timm_convit_mhsa_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm ConViT ``MHSA.forward`` (its non-local layers): plain multi-head self-attention."""
    B, N, C = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    x = dispatch.attention(q, k, v, scale=self.scale, dropout_p=self.attn_drop.p if self.training else 0.0)  # (B, H, N, D)
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


def timm_levit_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm LeViT ``Attention.forward``: the attention-bias table as a float bias, value dim != key dim.
    The bias is gathered per call (timm caches it per device in eval: the same values)."""
    bias = self.attention_biases[:, self.attention_bias_idxs].unsqueeze(0)  # (1, H, N, N)
    if self.use_conv:
        B, _, H, W = x.shape
        q, k, v = self.qkv(x).view(B, self.num_heads, -1, H * W).split([self.key_dim, self.key_dim, self.val_dim], dim=2)
        q, k, v = (t.transpose(-2, -1) for t in (q, k, v))  # (B, heads, N, D): tokens last-but-one
        x = dispatch.attention(q, k, v, bias, scale=self.scale)  # (B, heads, N, Dv)
        x = x.transpose(-2, -1).reshape(B, -1, H, W)
    else:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))  # (B, heads, N, D)
        x = dispatch.attention(q, k, v, bias, scale=self.scale)  # (B, heads, N, Dv)
        x = x.transpose(1, 2).reshape(B, N, self.val_attn_dim)
    return self.proj(x)


def written_out_problem(site: Site) -> str | None:
    module = site.module
    head_dim = _module_head_dim(module)
    if head_dim is None and hasattr(module, "num_heads") and hasattr(module, "proj"):
        head_dim = getattr(module.proj, "in_features", 0) // module.num_heads
    return overrides(module, site.cls) or (head_dim_problem(head_dim) if head_dim else None) or patched_elsewhere(module)


def written_out_patch(forward):
    """The patch of a target whose forward is written out here."""
    return lambda site: {site.module: {"forward": bound(forward, site.module)}}


def _torchvision_shifted_window_attention(
    input, qkv_weight, proj_weight, relative_position_bias, window_size, num_heads, shift_size,
    attention_dropout=0.0, dropout=0.0, qkv_bias=None, proj_bias=None, logit_scale=None, training=True,
):
    """torchvision's ``shifted_window_attention``, with the attention through ``kernels.attention``:
    windows as the batch, the relative-position bias and the shift mask as one float bias; V2's
    cosine attention as normalised q, k with the per-head logit scale folded into q (scale 1)."""
    B, H, W, C = input.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    shift_size = shift_size.copy()
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)  # (B * nW, N, C)
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length : 2 * length].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    q, k, v = qkv.reshape(x.size(0), x.size(1), 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B * nW, heads, N, D)
    scale = None
    if logit_scale is not None:
        q = F.normalize(q, dim=-1) * torch.clamp(logit_scale, max=math.log(100.0)).exp()
        k = F.normalize(k, dim=-1)
        scale = 1.0
    bias = relative_position_bias  # (1, heads, N, N)
    if sum(shift_size) > 0:
        attn_mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0] : h[1], w[0] : w[1]] = count
                count += 1
        attn_mask = attn_mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1])
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
        bias = _as_kernel_bias(bias + attn_mask.unsqueeze(1), x.size(0))  # (B * nW, heads, N, N)
    x = dispatch.attention(q, k, v, bias, scale=scale, dropout_p=attention_dropout if training else 0.0)
    x = x.transpose(1, 2).reshape(x.size(0), x.size(2), C)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


def torchvision_swin_problem(site: Site) -> str | None:
    module = site.module
    code = inspect.unwrap(site.cls.forward).__code__
    if "shifted_window_attention" not in code.co_names:
        return f"{site.cls.__name__}.forward does not call shifted_window_attention"
    return overrides(module, site.cls) or head_dim_problem(module.qkv.out_features // 3 // module.num_heads) or patched_elsewhere(module)


def torchvision_swin_patch(site: Site) -> dict:
    forward = redirected(site.cls.forward, (("shifted_window_attention", _torchvision_shifted_window_attention),))
    return {site.module: {"forward": bound(forward, site.module)}}


def torchvision_maxvit_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """torchvision MaxViT ``RelativePositionalMultiHeadAttention.forward``: the partitions (G) join
    the batch, the relative-position bias is a float bias."""
    B, G, P, D = x.shape
    H, DH = self.n_heads, self.head_dim
    q, k, v = torch.chunk(self.to_qkv(x), 3, dim=-1)
    q, k, v = (t.reshape(B * G, P, H, DH).transpose(1, 2) for t in (q, k, v))  # (B * G, H, P, DH)
    out = dispatch.attention(q, k, v, self.get_relative_positional_bias(), scale=self.scale_factor)  # (B * G, H, P, DH)
    return self.merge(out.transpose(1, 2).reshape(B, G, P, D))


def timm_mvitv2_attention_forward(self, x: torch.Tensor, feat_size: list[int]):
    """timm MViTv2 ``MultiScaleAttention.forward``: pooled q, k, v (Nq < Nk); the decomposed
    relative positions, computed from q by timm's own ``cal_rel_pos_type`` on a zero tensor,
    are the float bias (their gradient reaches q through it)."""
    mvitv2 = sys.modules[type(self).__module__]
    B, N, _ = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(dim=0)  # (B, H, N, D)
    if self.pool_q is not None:
        q, q_tok = mvitv2.reshape_pre_pool(q, feat_size, self.has_cls_token)
        q, q_size = mvitv2.reshape_post_pool(self.pool_q(q), self.num_heads, q_tok)
    else:
        q_size = feat_size
    if self.norm_q is not None:
        q = self.norm_q(q)
    if self.pool_k is not None:
        k, k_tok = mvitv2.reshape_pre_pool(k, feat_size, self.has_cls_token)
        k, k_size = mvitv2.reshape_post_pool(self.pool_k(k), self.num_heads, k_tok)
    else:
        k_size = feat_size
    if self.norm_k is not None:
        k = self.norm_k(k)
    if self.pool_v is not None:
        v, v_tok = mvitv2.reshape_pre_pool(v, feat_size, self.has_cls_token)
        v, _ = mvitv2.reshape_post_pool(self.pool_v(v), self.num_heads, v_tok)
    if self.norm_v is not None:
        v = self.norm_v(v)
    bias = None
    if self.rel_pos_type == "spatial":
        zeros = q.new_zeros(B, self.num_heads, q.shape[2], k.shape[2])
        bias = mvitv2.cal_rel_pos_type(zeros, q, self.has_cls_token, q_size, k_size, self.rel_pos_h, self.rel_pos_w)
    x = dispatch.attention(q, k, v, bias, scale=self.scale)  # (B, H, Nq, D)
    if self.residual_pooling:
        x = x + q
    x = x.transpose(1, 2).reshape(B, -1, self.dim_out)
    return self.proj(x), q_size


def timm_mvitv2_problem(site: Site) -> str | None:
    module = site.module
    mvitv2 = sys.modules[site.cls.__module__]
    for name in ("reshape_pre_pool", "reshape_post_pool", "cal_rel_pos_type"):
        if not hasattr(mvitv2, name):
            return f"this timm's mvitv2 has no {name}"
    return overrides(module, site.cls) or head_dim_problem(module.dim_out // module.num_heads) or patched_elsewhere(module)


def timm_levit_attention_downsample_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm LeViT ``AttentionDownsample.forward``: sub-sampled queries (Nq < Nk), the attention-bias
    table as a float bias, value dim != key dim."""
    bias = self.attention_biases[:, self.attention_bias_idxs].unsqueeze(0)  # (1, H, Nq, Nk)
    if self.use_conv:
        B, _, H, W = x.shape
        HH, WW = (H - 1) // self.stride + 1, (W - 1) // self.stride + 1
        k, v = self.kv(x).view(B, self.num_heads, -1, H * W).split([self.key_dim, self.val_dim], dim=2)
        q = self.q(x).view(B, self.num_heads, self.key_dim, -1)
        q, k, v = (t.transpose(-2, -1) for t in (q, k, v))  # (B, heads, N, D)
        x = dispatch.attention(q, k, v, bias, scale=self.scale).transpose(-2, -1).reshape(B, self.val_attn_dim, HH, WW)
    else:
        B, N, _ = x.shape
        k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        k, v = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)  # (B, heads, N, D)
        q = self.q(x).view(B, -1, self.num_heads, self.key_dim).permute(0, 2, 1, 3)  # (B, heads, Nq, D)
        x = dispatch.attention(q, k, v, bias, scale=self.scale).transpose(1, 2).reshape(B, -1, self.val_attn_dim)
    return self.proj(x)


def timm_cascaded_group_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm EfficientViT-M ``CascadedGroupAttention.forward``: each head's input adds the previous
    head's output, so the heads run one after another: one ``kernels.attention`` call per head."""
    B, _, H, W = x.shape
    feats_in = x.chunk(len(self.qkvs), dim=1)
    feats_out = []
    feat = feats_in[0]
    attn_bias = self.attention_biases[:, self.attention_bias_idxs]  # (heads, N, N)
    for head_idx, (qkv, dws) in enumerate(zip(self.qkvs, self.dws)):
        if head_idx > 0:
            feat = feat + feats_in[head_idx]
        q, k, v = qkv(feat).view(B, -1, H, W).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
        q = dws(q)
        q, k, v = (t.flatten(2).transpose(1, 2).unsqueeze(1) for t in (q, k, v))  # (B, 1, N, D)
        feat = dispatch.attention(q, k, v, attn_bias[head_idx], scale=self.scale)  # (B, 1, N, Dv)
        feat = feat.squeeze(1).transpose(1, 2).reshape(B, self.val_dim, H, W)
        feats_out.append(feat)
    return self.proj(torch.cat(feats_out, 1))
