"""Putting vitriton's kernels into the ViTs people already have: timm, torchvision, Hugging Face, ours.

    report = kernels.swap(model)     # in place, on the model you already built and loaded
    print(report)                    # what it replaced, and what it left alone and why
    report.undo()                    # or kernels.unswap(model): the original forwards, exactly

The Liger-Kernel way: ``forward`` is patched on each recognised *instance* (never on a class),
so the weights stay the very same Parameter objects, ``state_dict()`` keeps its keys and
tensors, checkpoints load and save as before, and other models of the same class are untouched.
Nothing has to happen before the model is built. The patched forwards are plain functions of
the module's own attributes (no state is written during a forward), so ``torch.compile`` traces
them; they are module-level functions bound to the module through a weak reference, so a swapped
model still deep-copies and pickles, and ``del model`` frees it at once (no reference cycle).

What is recognised (found by class, looked up among the modules already imported: swapping a
model never imports timm, torchvision or transformers for you):

  timm          ``Attention``: the attention itself goes through ``kernels.attention`` on
                views of the qkv projection; ``PatchEmbed`` with its owning ``VisionTransformer``:
                projection, class token and position embedding in one ``kernels.patch_embed``.
  torch         ``nn.MultiheadAttention`` (torchvision's ViT uses it): self-attention calls
                without weights or masks, the call torchvision makes, go through the kernel.
  torchvision   ``VisionTransformer``: ``conv_proj`` + ``class_token`` + ``encoder.pos_embedding``.
  transformers  ``ViTAttention``: the model's attention implementation becomes "vitriton",
                registered with transformers' ``AttentionInterface``; ``ViTEmbeddings``.
  vit           ``MultiHeadAttention`` and ``PatchEmbedding``: their ``fused`` flag is turned on.

Anything whose configuration the kernels cannot compute exactly, or whose shapes they cannot
take (a head dim outside 16-256), is left alone, and the report says why. Swapped modules call
with ``backend=None``: Triton where the kernels can take the input, the einsum fallback
otherwise, as ``kernels.use_backend`` / ``VITRITON_BACKEND`` choose.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from kernels import dispatch
from kernels.attention import MAX_HEAD_DIM, MIN_HEAD_DIM

HF_ATTENTION_NAME = "vitriton"
_RECORD = "_vitriton_swap"  # the attribute that holds a swapped module's undo record

ATTENTION_DONE = "-> kernels.attention"
PATCH_EMBED_DONE = "-> kernels.patch_embed"


def _loaded_class(module_name: str, class_name: str):
    """A class from a library the user has already imported, else None: swap imports nothing."""
    return getattr(sys.modules.get(module_name), class_name, None)


# ---------------------------------------------------------------------------------------------
# The report.


@dataclasses.dataclass(frozen=True)
class SwapEntry:
    """One module: where it is (``path`` from the model, "" for the model itself), what it is,
    and a note: how it now runs, or why it was left alone."""

    path: str
    kind: str
    note: str


class SwapReport:
    """What ``swap`` did: ``replaced``, ``already_swapped`` and ``left_alone``, lists of SwapEntry."""

    def __init__(self, model: nn.Module, token: object):
        self.model_name = type(model).__name__
        self.replaced: list[SwapEntry] = []
        self.already_swapped: list[SwapEntry] = []
        self.left_alone: list[SwapEntry] = []
        self._model = model
        self._token = token

    def undo(self) -> list[str]:
        """Restore the modules this swap replaced; returns their paths."""
        return _restore(self._model, self._token)

    def __str__(self) -> str:
        rows = [("replaced", e) for e in self.replaced]
        rows += [("already swapped", e) for e in self.already_swapped]
        rows += [("left alone", e) for e in self.left_alone]
        head = (
            f"swap({self.model_name}): {len(self.replaced)} replaced, "
            f"{len(self.already_swapped)} already swapped, {len(self.left_alone)} left alone"
        )
        status_width = max((len(status) for status, _ in rows), default=0)
        path_width = max((len(e.path or "(model)") for _, e in rows), default=0)
        lines = [head]
        for status, e in rows:
            separator = ": " if status == "left alone" else " "
            lines.append(f"  {status:<{status_width}}  {e.path or '(model)':<{path_width}}  {e.kind}{separator}{e.note}")
        return "\n".join(lines)

    __repr__ = __str__


# ---------------------------------------------------------------------------------------------
# Patching and undoing. Each patched module keeps an undo record: the previous value of every
# instance attribute it changed (_Absent: there was none, the class's applies).


class _Absent:
    """'No instance attribute of this name': a class, so deepcopy and pickle keep its identity."""


@dataclasses.dataclass
class _UndoRecord:
    token: object
    previous: dict
    attn_implementation: str | None = None  # transformers: the implementation before the swap
    covers: tuple[str, ...] = ()  # transformers: the attention layers (paths below) it switched


def _patch(module: nn.Module, token: object, **values) -> None:
    previous = {name: module.__dict__.get(name, _Absent) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    setattr(module, _RECORD, _UndoRecord(token, previous))


def _restore(model: nn.Module, token: object | None) -> list[str]:
    restored = []
    for path, module in model.named_modules():
        record = module.__dict__.get(_RECORD)
        if record is None or (token is not None and record.token is not token):
            continue
        for name, value in record.previous.items():
            if value is _Absent:
                module.__dict__.pop(name, None)
            else:
                setattr(module, name, value)
        if record.attn_implementation is not None:
            module.set_attn_implementation(record.attn_implementation)
        del module.__dict__[_RECORD]
        restored.append(path)
        restored.extend(f"{path}.{below}" if path else below for below in record.covers)
    return restored


def unswap(model: nn.Module) -> list[str]:
    """Undo every swap done on ``model`` (or on its parts); returns the paths restored."""
    return _restore(model, None)


class _BoundForward:
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
        return _BoundForward(self.function, memo.get(id(module), module))

    def __reduce__(self):
        return _BoundForward, (self.function, self.module_ref())


def _bound(function, module: nn.Module) -> _BoundForward:
    return _BoundForward(function, module)


def _head_dim_problem(head_dim: int) -> str | None:
    """The kernels' own limit, checked at swap time so a swapped model never fails later."""
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        return f"head dim {head_dim}: the Triton kernels take {MIN_HEAD_DIM} to {MAX_HEAD_DIM}"
    return None


def _forward_patched_elsewhere(*modules: nn.Module) -> str | None:
    for module in modules:
        if "forward" in module.__dict__:
            return f"{type(module).__name__}.forward is already patched on this instance by something else"
    return None


def _is_patch_conv(conv: nn.Module) -> str | None:
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


# ---------------------------------------------------------------------------------------------
# timm: Attention, and PatchEmbed with its VisionTransformer.

_TIMM_ATTENTION_ARGUMENTS = ("self", "x", "attn_mask", "is_causal")


def _timm_attention_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
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


def _timm_attention_problem(module: nn.Module, attention_class) -> str | None:
    if type(module).forward is not attention_class.forward:
        return f"{type(module).__name__} overrides timm Attention.forward"
    arguments = tuple(inspect.signature(attention_class.forward).parameters)
    if arguments != _TIMM_ATTENTION_ARGUMENTS[: len(arguments)]:
        return f"this timm's Attention.forward takes {arguments}; swap knows {_TIMM_ATTENTION_ARGUMENTS}"
    for name in ("qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop", "num_heads", "head_dim", "scale"):
        if not hasattr(module, name):
            return f"this timm's Attention has no {name!r}"
    return _head_dim_problem(module.head_dim) or _forward_patched_elsewhere(module)


def _timm_vit_patch_embed_forward(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``vit.patch_embed(x)`` followed by the class token and position part of ``vit._pos_embed``.

    Installed as ``vit.patch_embed.forward``, while ``vit._pos_embed`` keeps only its ``pos_drop``:
    every path through the model (``forward_features``, ``forward_intermediates``) calls the two
    in sequence, so the model computes what it did. ``vit.patch_embed(x)`` alone now returns the
    tokens with class token and positions.
    """
    patch_embed = vit.patch_embed
    _, _, height, width = x.shape
    torch._assert(height == patch_embed.img_size[0], f"Input height ({height}) doesn't match model ({patch_embed.img_size[0]}).")
    torch._assert(width == patch_embed.img_size[1], f"Input width ({width}) doesn't match model ({patch_embed.img_size[1]}).")
    pos_embed = vit.pos_embed  # (1, [1 +] N, D) or None
    if pos_embed is not None and vit.no_embed_class and vit.cls_token is not None:
        # no_embed_class: timm adds the positions to the patches only, then prepends the class
        # token. A zero row for the class token is the same sum, exactly (c + 0 == c).
        pos_embed = torch.cat([pos_embed.new_zeros(1, 1, pos_embed.shape[-1]), pos_embed], dim=1)
    return dispatch.patch_embed(x, patch_embed.proj.weight, patch_embed.proj.bias, vit.cls_token, pos_embed)


def _timm_vit_pos_drop_only(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``vit._pos_embed`` once the patch embedding has added the class token and positions."""
    return vit.pos_drop(x)


def _timm_patch_embed_problem(vit: nn.Module, vit_class, patch_embed_class) -> str | None:
    patch_embed = vit.patch_embed
    if patch_embed_class is None or not isinstance(patch_embed, patch_embed_class):
        return f"its patch_embed is a {type(patch_embed).__name__}, not timm's PatchEmbed"
    if type(patch_embed).forward is not patch_embed_class.forward:
        return f"{type(patch_embed).__name__} overrides PatchEmbed.forward"
    for name in ("_pos_embed", "forward_features", "forward_intermediates"):
        if getattr(type(vit), name, None) is not getattr(vit_class, name, None):
            return f"{type(vit).__name__} overrides VisionTransformer.{name}"
    if "_pos_embed" in vit.__dict__:
        return "VisionTransformer._pos_embed is already patched on this instance by something else"
    if vit.dynamic_img_size:
        return "dynamic_img_size=True: the position embedding is resampled for each input size"
    if patch_embed.img_size is None or not patch_embed.strict_img_size or patch_embed.dynamic_img_pad:
        return "the patch embedding takes images of any size (strict_img_size=False or dynamic_img_pad)"
    if not patch_embed.flatten:
        return f"output_fmt={patch_embed.output_fmt}: the patch embedding does not flatten to (B, N, D)"
    if not isinstance(patch_embed.norm, nn.Identity):
        return "embed_norm_layer: a norm sits between the projection and the class token"
    if getattr(vit, "reg_token", None) is not None:
        return (
            f"reg_tokens={vit.num_reg_tokens}: register tokens sit between the class token and the "
            "patches, and kernels.patch_embed prepends one class token only"
        )
    return _is_patch_conv(patch_embed.proj) or _forward_patched_elsewhere(patch_embed)


# ---------------------------------------------------------------------------------------------
# torch.nn.MultiheadAttention (inside torchvision's EncoderBlock) and torchvision's VisionTransformer.


def _multihead_attention_forward(
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
    """``nn.MultiheadAttention.forward``: self-attention without weights or masks through the kernel.

    That is the call torchvision's EncoderBlock makes (``attn(x, x, x, need_weights=False)``).
    Any other call (weights asked for, masks, cross-attention, unbatched input) runs the
    original forward, so the module's meaning never changes.
    """
    if (
        need_weights
        or key_padding_mask is not None
        or attn_mask is not None
        or is_causal
        or query.dim() != 3
        or not (query is key and key is value)
    ):
        return type(self).forward(
            self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
    x = query if self.batch_first else query.transpose(0, 1)  # (B, N, E)
    B, N, E = x.shape
    qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, N, 3, self.num_heads, self.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) each: strided views, no copy
    out = dispatch.attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, H, N, D)
    out = F.linear(out.transpose(1, 2).reshape(B, N, E), self.out_proj.weight, self.out_proj.bias)  # (B, N, E)
    return (out if self.batch_first else out.transpose(0, 1)), None


def _multihead_attention_problem(module: nn.MultiheadAttention) -> str | None:
    if type(module).forward is not nn.MultiheadAttention.forward:
        return f"{type(module).__name__} overrides nn.MultiheadAttention.forward"
    if not module._qkv_same_embed_dim or module.in_proj_weight is None:
        return "kdim/vdim differ from embed_dim (separate q, k, v projections)"
    if module.bias_k is not None or module.add_zero_attn:
        return "add_bias_kv or add_zero_attn: extra key/value rows the kernel does not add"
    return _head_dim_problem(module.head_dim) or _forward_patched_elsewhere(module)


def _torchvision_vit_forward(self, x: torch.Tensor) -> torch.Tensor:
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


def _torchvision_vit_problem(vit: nn.Module, vit_class, encoder_class) -> str | None:
    for name in ("forward", "_process_input"):
        if getattr(type(vit), name) is not getattr(vit_class, name):
            return f"{type(vit).__name__} overrides VisionTransformer.{name}"
    encoder = vit.encoder
    if type(encoder).forward is not encoder_class.forward:
        return f"its encoder ({type(encoder).__name__}) overrides Encoder.forward"
    if not isinstance(vit.conv_proj, nn.Conv2d):
        return "conv_stem_configs: a convolutional stem, not one stride-P projection"
    return _is_patch_conv(vit.conv_proj) or _forward_patched_elsewhere(vit, encoder)


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers: ViTAttention through the attention interface, and ViTEmbeddings.


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
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface function ("vitriton"), as ``sdpa_attention_forward``.

    query (B, H, Nq, D), key/value (B, H_kv, Nk, D); ``attention_mask`` None, bool (True = may
    attend, what the "vitriton" mask interface, ``sdpa_mask``, builds) or float (added).
    Returns the output as (B, Nq, H, D) and no attention weights, as SDPA's does.
    """
    for name in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='{HF_ATTENTION_NAME}': expected no {name}, got one; use 'eager' or 'sdpa'")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    # Grouped-query attention (fewer key/value heads) as SDPA's enable_gqa: the drop-in handles it.
    out = dispatch.scaled_dot_product_attention(
        query, key, value, attention_mask, dropout, is_causal, scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None  # (B, Nq, H, D)


def register_transformers_attention() -> str:
    """Register "vitriton" with transformers (attention and mask interfaces); returns the name.

    After this, ``ViTForImageClassification.from_pretrained(..., attn_implementation="vitriton")``
    or ``ViTConfig(attn_implementation="vitriton")`` build models that run on our kernels.
    Masks are built as for "sdpa" (bool, True = may attend). ``swap`` calls it for you.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(HF_ATTENTION_NAME, transformers_attention)
    AttentionMaskInterface.register(HF_ATTENTION_NAME, sdpa_mask)
    return HF_ATTENTION_NAME


def _vit_embeddings_forward(
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


def _vit_embeddings_problem(embeddings: nn.Module, embeddings_class, patches_class) -> str | None:
    if type(embeddings).forward is not embeddings_class.forward:
        return f"{type(embeddings).__name__} overrides ViTEmbeddings.forward"
    patches = embeddings.patch_embeddings
    if patches_class is None or type(patches).forward is not patches_class.forward:
        return f"its patch_embeddings ({type(patches).__name__}) is not transformers' ViTPatchEmbeddings"
    return _is_patch_conv(patches.projection) or _forward_patched_elsewhere(embeddings)


# ---------------------------------------------------------------------------------------------
# Vision towers of vision-language models that pack images into one sequence (cu_seqlens).

# (module, class) of the Qwen vision attentions: one forward (hidden_states (total, E),
# cu_seqlens, position_embeddings (cos, sin), max_seqlen), rotary from their own module.
QWEN_VISION_ATTENTIONS = (
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "VisionAttention"),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLVisionAttention"),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionAttention"),
)


def _qwen_vision_attention_forward(
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
    longest = max_seqlen if isinstance(max_seqlen, int) else None
    out = dispatch.attention_varlen(
        q, k, v, cu_seqlens, cu_seqlens, longest, longest,
        scale=self.scaling, dropout_p=self.attention_dropout if self.training else 0.0,
    )  # (total, H, D)
    return self.proj(out.reshape(seq_length, -1))


def _qwen_vision_attention_problem(module: nn.Module) -> str | None:
    if getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb_vision", None) is None:
        return "its module has no apply_rotary_pos_emb_vision to apply the rotary embedding with"
    return _head_dim_problem(module.head_dim) or _forward_patched_elsewhere(module)


# ---------------------------------------------------------------------------------------------
# The walk.

KNOWN = (
    "timm Attention and PatchEmbed in a VisionTransformer, torch nn.MultiheadAttention, "
    "torchvision VisionTransformer, transformers ViTAttention and ViTEmbeddings, "
    "transformers Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision attention, "
    "vit MultiHeadAttention and PatchEmbedding"
)


class _Walk:
    """One swap: the classes of the libraries that are loaded, the report, the undo token."""

    def __init__(self, model: nn.Module, attention: bool, patch_embed: bool):
        self.model, self.attention, self.patch_embed = model, attention, patch_embed
        self.token = object()
        self.report = SwapReport(model, self.token)
        self.claimed: set[int] = set()  # modules swapped as part of their owner
        self.timm_attention = _loaded_class("timm.layers.attention", "Attention")
        self.timm_patch_embed = _loaded_class("timm.layers.patch_embed", "PatchEmbed")
        self.timm_vit = _loaded_class("timm.models.vision_transformer", "VisionTransformer")
        self.tv_vit = _loaded_class("torchvision.models.vision_transformer", "VisionTransformer")
        self.tv_encoder = _loaded_class("torchvision.models.vision_transformer", "Encoder")
        self.hf_attention = _loaded_class("transformers.models.vit.modeling_vit", "ViTAttention")
        self.hf_embeddings = _loaded_class("transformers.models.vit.modeling_vit", "ViTEmbeddings")
        self.hf_patches = _loaded_class("transformers.models.vit.modeling_vit", "ViTPatchEmbeddings")
        self.hf_pretrained = _loaded_class("transformers.models.vit.modeling_vit", "ViTPreTrainedModel")
        self.qwen_attentions = tuple(c for c in (_loaded_class(m, n) for m, n in QWEN_VISION_ATTENTIONS) if c is not None)
        self.vit_attention = _loaded_class("vit.model", "MultiHeadAttention")
        self.vit_patch_embedding = _loaded_class("vit.model", "PatchEmbedding")

    def _is(self, module, cls) -> bool:
        return cls is not None and isinstance(module, cls)

    def _swap(self, path, module, kind, asked, problem, done, **values):
        """Patch ``values`` onto ``module`` unless not asked, already swapped, or ``problem``."""
        if not asked:
            self.report.left_alone.append(SwapEntry(path, kind, "not asked (attention=False or patch_embed=False)"))
        elif _RECORD in module.__dict__:
            self.report.already_swapped.append(SwapEntry(path, kind, done))
        elif problem is not None:
            self.report.left_alone.append(SwapEntry(path, kind, problem))
        else:
            _patch(module, self.token, **values)
            self.report.replaced.append(SwapEntry(path, kind, done))
            return True
        return False

    def visit(self, path: str, module: nn.Module) -> None:
        if id(module) in self.claimed:
            return
        if self._is(module, self.timm_attention):
            problem = _timm_attention_problem(module, self.timm_attention)
            self._swap(path, module, "timm Attention", self.attention, problem, ATTENTION_DONE,
                       forward=_bound(_timm_attention_forward, module))
        elif self._is(module, self.timm_vit):
            self._visit_timm_vit(path, module)
        elif self._is(module, self.timm_patch_embed):
            self.report.left_alone.append(SwapEntry(
                path, "timm PatchEmbed",
                "not the patch_embed of a timm VisionTransformer, whose class token and "
                "position embedding swap fuses with it",
            ))
        elif isinstance(module, nn.MultiheadAttention):
            self._swap(path, module, "nn.MultiheadAttention", self.attention, _multihead_attention_problem(module),
                       ATTENTION_DONE + " (self-attention calls without weights or masks)",
                       forward=_bound(_multihead_attention_forward, module))
        elif self._is(module, self.tv_vit):
            self._visit_torchvision_vit(path, module)
        elif self._is(module, self.hf_embeddings):
            problem = _vit_embeddings_problem(module, self.hf_embeddings, self.hf_patches)
            self._swap(path, module, "transformers ViTEmbeddings", self.patch_embed, problem,
                       PATCH_EMBED_DONE + " (bool_masked_pos or interpolate_pos_encoding run the original)",
                       forward=_bound(_vit_embeddings_forward, module))
        elif self.qwen_attentions and type(module) in self.qwen_attentions:
            self._swap(path, module, f"transformers {type(module).__name__}", self.attention,
                       _qwen_vision_attention_problem(module),
                       "-> kernels.attention_varlen (one call per layer over the packed images)",
                       forward=_bound(_qwen_vision_attention_forward, module))
        elif self._is(module, self.vit_attention) or self._is(module, self.vit_patch_embedding):
            self._visit_vit(path, module)

    def _visit_timm_vit(self, path: str, vit: nn.Module) -> None:
        patch_embed = vit.patch_embed
        self.claimed.add(id(patch_embed))
        kind = "timm PatchEmbed + cls_token + pos_embed"
        problem = _timm_patch_embed_problem(vit, self.timm_vit, self.timm_patch_embed)
        where = f"{path}.patch_embed" if path else "patch_embed"
        if self._swap(where, patch_embed, kind, self.patch_embed, problem,
                      PATCH_EMBED_DONE + " (and _pos_embed keeps only pos_drop)",
                      forward=_bound(_timm_vit_patch_embed_forward, vit)):
            _patch(vit, self.token, _pos_embed=_bound(_timm_vit_pos_drop_only, vit))

    def _visit_torchvision_vit(self, path: str, vit: nn.Module) -> None:
        kind = "torchvision VisionTransformer conv_proj + class_token + encoder.pos_embedding"
        problem = _torchvision_vit_problem(vit, self.tv_vit, self.tv_encoder)
        if self._swap(path, vit, kind, self.patch_embed, problem,
                      PATCH_EMBED_DONE + " (and the encoder no longer adds pos_embedding)",
                      forward=_bound(_torchvision_vit_forward, vit)):
            _patch(vit.encoder, self.token, forward=_bound(_torchvision_encoder_forward, vit.encoder))

    def _visit_vit(self, path: str, module: nn.Module) -> None:
        is_attention = self._is(module, self.vit_attention)
        kind = f"vit {type(module).__name__}"
        asked = self.attention if is_attention else self.patch_embed
        if asked and module.fused and _RECORD not in module.__dict__:
            self.report.already_swapped.append(SwapEntry(path, kind, "built with fused=True"))
            return
        done = ATTENTION_DONE if is_attention else PATCH_EMBED_DONE
        problem = _head_dim_problem(module.qkv.in_features // module.num_heads) if is_attention else None
        self._swap(path, module, kind, asked, problem, f"{done} (fused=True)", fused=True)

    def switch_transformers_attention(self) -> None:
        """Point each ViT model's attention implementation at "vitriton"; report every ViTAttention."""
        if self.hf_attention is None:
            return
        layers = [(p, m) for p, m in self.model.named_modules() if isinstance(m, self.hf_attention)]
        if not layers:
            return
        kind = "transformers ViTAttention"
        done = f"{ATTENTION_DONE} (attn_implementation='{HF_ATTENTION_NAME}')"
        if not self.attention:
            for path, _ in layers:
                self.report.left_alone.append(SwapEntry(path, kind, "not asked (attention=False)"))
            return
        register_transformers_attention()
        models, tops = {}, []
        for path, module in self.model.named_modules():
            if self._is(module, self.hf_pretrained) and not any(path.startswith(f"{top}.") or top == "" for top in tops):
                tops.append(path)
                models[path] = module
        def top_of(path: str) -> str | None:
            return next((top for top in tops if top == "" or path.startswith(f"{top}.")), None)

        swapped_now = set()
        too_wide = {}  # top model -> why its head dim is beyond the kernels
        for path, module in layers:
            problem = _head_dim_problem(module.head_dim)
            if problem is not None and top_of(path) is not None:
                too_wide.setdefault(top_of(path), problem)
        for top, pretrained in models.items():
            if top in too_wide or _RECORD in pretrained.__dict__ or pretrained.config._attn_implementation == HF_ATTENTION_NAME:
                continue
            previous = pretrained.config._attn_implementation
            pretrained.set_attn_implementation(HF_ATTENTION_NAME)
            covers = tuple(
                path.removeprefix(f"{top}.") if top else path
                for path, module in layers
                if top_of(path) == top and module.config._attn_implementation == HF_ATTENTION_NAME
            )
            setattr(pretrained, _RECORD, _UndoRecord(self.token, {}, previous, covers))
            swapped_now.add(top)
        for path, module in layers:
            top = top_of(path)
            if top in too_wide:
                self.report.left_alone.append(SwapEntry(path, kind, too_wide[top]))
            elif module.config._attn_implementation != HF_ATTENTION_NAME:
                why = "not inside a transformers ViT model" if top is None else (
                    f"its config's attn_implementation is {module.config._attn_implementation!r}, "
                    "which set_attn_implementation did not change"
                )
                self.report.left_alone.append(SwapEntry(path, kind, why))
            elif top in swapped_now:
                self.report.replaced.append(SwapEntry(path, kind, done))
            else:
                self.report.already_swapped.append(SwapEntry(path, kind, done))


def swap(model: nn.Module, attention: bool = True, patch_embed: bool = True) -> SwapReport:
    """Put vitriton's kernels into ``model`` in place; returns a report (print it) with ``undo()``.

    ``attention`` and ``patch_embed`` choose what to replace. Parameters are not copied or moved:
    ``state_dict()`` is unchanged. Swapping a swapped model changes nothing and says so. A model
    with no module swap knows is a ValueError.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap: expected a torch.nn.Module, got {type(model).__name__}")
    walk = _Walk(model, attention, patch_embed)
    for path, module in model.named_modules():
        walk.visit(path, module)
    walk.switch_transformers_attention()
    report = walk.report
    if not (report.replaced or report.already_swapped or report.left_alone):
        raise ValueError(
            f"swap: found no attention or patch-embedding module it knows in {type(model).__name__}; it knows {KNOWN}"
        )
    return report
