"""Hugging Face transformers on our kernels: the attention interface, the modules that bypass it, their rows.

Most transformers vision models pick their attention per layer from ``ALL_ATTENTION_FUNCTIONS
[config._attn_implementation]``: swap registers "vitriton" (``transformers_attention``, masks as
for "sdpa") and switches the whole model to it, or leaves the whole model if one layer is beyond
the kernels. Modules that bypass the interface have forwards here: ``ViTEmbeddings`` (projection,
[CLS] and positions in one ``kernels.patch_embed`` call), the SigLIP pooling heads, Data2VecVision's
self-attention, and the VLM vision towers, which pack the images of a batch into one sequence:
Qwen2-VL / Qwen2.5-VL / Qwen3-VL and Pixtral make one ``kernels.attention_varlen`` call per layer
(Pixtral's model passes cu_seqlens instead of its block-diagonal mask). A call that asks for the
attention weights runs the model's own eager attention.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch
from torch import nn

from kernels import dispatch
from kernels.swap.redirect import redirected, sdpa_aliases
from kernels.swap.report import ATTN_IMPLEMENTATION, RECORD
from kernels.swap.rows import (
    ATTENTION_DONE,
    PATCH_EMBED_DONE,
    Site,
    SwapTarget,
    bound,
    head_dim_problem,
    is_patch_conv,
    module_head_dim,
    overrides,
    patched_elsewhere,
    redirected_row,
)
from kernels.swap.torch_nn import (
    multihead_attention_problem,
    multihead_attention_through_kernel,
)

HF_ATTENTION_NAME = "vitriton"

# ---------------------------------------------------------------------------------------------
# Attention layers through the attention interface ("vitriton").


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
    head_dim = module_head_dim(layer)
    if head_dim is not None and head_dim_problem(head_dim):
        return head_dim_problem(head_dim)
    if getattr(layer.config, "attn_logit_softcapping", None) is not None:
        return f"{type(layer).__name__} caps its logits (attn_logit_softcapping), which the kernels do not"
    if getattr(layer, "sinks", None) is not None:
        return f"{type(layer).__name__} has attention sinks, which the kernels do not add"
    return None


def register_transformers_attention() -> str:
    """Register "vitriton" with transformers (attention and mask interfaces); returns the name.

    After this, ``ViTForImageClassification.from_pretrained(..., attn_implementation="vitriton")``
    or ``ViTConfig(attn_implementation="vitriton")`` build models that run on our kernels.
    Masks are built as for "sdpa" (bool, True = may attend). ``swap`` calls it for you, first
    thing, whatever the model, once transformers is imported.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(HF_ATTENTION_NAME, transformers_attention)
    AttentionMaskInterface.register(HF_ATTENTION_NAME, sdpa_mask)
    return HF_ATTENTION_NAME


# ---------------------------------------------------------------------------------------------
# Modules that bypass the interface.


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


# ---------------------------------------------------------------------------------------------
# The VLM vision towers. Qwen2-VL / Qwen2.5-VL / Qwen3-VL: one forward (hidden_states (total, E),
# cu_seqlens, position_embeddings (cos, sin), max_seqlen), rotary from their own module.


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
# transformers' rows: modules that bypass the attention interface, then every layer that reads it.

HF = "transformers.models"
ROWS: tuple[SwapTarget, ...] = (
    SwapTarget(
        library="transformers", module_name=f"{HF}.vit.modeling_vit", class_name="ViTEmbeddings", swap_argument="patch_embed",
        becomes=f"{PATCH_EMBED_DONE} (bool_masked_pos or interpolate_pos_encoding run the original)",
        why_left_alone=vit_embeddings_problem, instance_patches=vit_embeddings_patch,
    ),
    *(
        SwapTarget(
            library="transformers", module_name=f"{HF}.{module_name}", class_name=class_name, swap_argument="attention",
            becomes="-> kernels.attention_varlen (one call per layer over the packed images)",
            why_left_alone=qwen_vision_attention_problem, instance_patches=qwen_vision_attention_patch,
        )
        for module_name, class_name in (
            ("qwen2_vl.modeling_qwen2_vl", "VisionAttention"),
            ("qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLVisionAttention"),
            ("qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionAttention"),
        )
    ),
    SwapTarget(
        library="transformers", module_name=f"{HF}.pixtral.modeling_pixtral", class_name="PixtralVisionModel",
        swap_argument="attention",
        becomes="cu_seqlens of the packed images instead of its block-diagonal (N, N) mask",
        why_left_alone=pixtral_vision_problem, instance_patches=pixtral_vision_patch,
    ),
    SwapTarget(
        library="transformers", module_name=f"{HF}.pixtral.modeling_pixtral", class_name="PixtralAttention",
        swap_argument="attention",
        becomes="-> kernels.attention_varlen over the packed images (kernels.attention when given a mask)",
        why_left_alone=pixtral_attention_problem, instance_patches=pixtral_attention_patch,
    ),
    *(
        SwapTarget(
            library="transformers", module_name=f"{HF}.{module_name}", class_name=class_name, swap_argument="attention",
            becomes=f"{ATTENTION_DONE}: the probe (Nq = 1) attends the tokens; the weights the head drops are not computed",
            why_left_alone=pooling_head_problem, instance_patches=pooling_head_patch,
            reported_submodule="attention", also_swaps=("attention",),
        )
        for module_name, class_name in (
            ("siglip.modeling_siglip", "SiglipMultiheadAttentionPoolingHead"),
            ("siglip2.modeling_siglip2", "Siglip2MultiheadAttentionPoolingHead"),
        )
    ),
    redirected_row(library="transformers", module_name=f"{HF}.aimv2.modeling_aimv2", class_name="Aimv2AttentionPoolingHead",
                   becomes="the class token (Nq = 1) attends the tokens"),
    SwapTarget(
        library="transformers", module_name=f"{HF}.data2vec.modeling_data2vec_vision",
        class_name="Data2VecVisionSelfAttention", swap_argument="attention",
        becomes=f"{ATTENTION_DONE}: its SDPA forward, relative-position bias as a float bias (output_attentions runs the original)",
        why_left_alone=data2vec_vision_problem, instance_patches=data2vec_vision_patch,
    ),
    SwapTarget(
        library="transformers", module_name="transformers", class_name="attention layers of the AttentionInterface",
        swap_argument="attention",
        becomes=f"{ATTENTION_DONE} (attn_implementation='{HF_ATTENTION_NAME}'; output_attentions=True runs eager)",
        why_left_alone=interface_attention_problem, instance_patches=interface_attention_patch,
        matches_module=reads_attention_interface, already_on_kernels=interface_attention_already,
    ),
)
