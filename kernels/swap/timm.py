"""timm's attention and patch embeddings on our kernels: the forwards, their checks, and timm's rows.

Three ways in. timm's ``Attention`` and ``PatchEmbed`` (with the ``VisionTransformer`` that owns it:
class, distillation and register tokens and the positions go into the one ``kernels.patch_embed``
call) have forwards written here. Most other timm attention modules end in one SDPA call after
their own preprocessing: their rows are ``redirected_row`` (redirect.py), their forward unchanged.
Those that write their attention out (Swin V2's cosine attention, CrossViT, ConViT's MHSA, LeViT,
MViTv2, EfficientViT-M's cascaded heads) have a copy here, the same preprocessing then our kernel.
Attention that is not one softmax over tokens (XCiT, talking heads, GPSA, linear attention,
differential attention) is listed as left out, with the reason.
"""

from __future__ import annotations

import inspect
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from kernels import dispatch
from kernels.swap.rows import (
    ATTENTION_DONE,
    PATCH_EMBED_DONE,
    Site,
    SwapTarget,
    as_batch_bias,
    bound,
    head_dim_problem,
    is_patch_conv,
    left_out_row,
    overrides,
    patched_elsewhere,
    redirected_row,
    written_out_patch,
    written_row,
)

# ---------------------------------------------------------------------------------------------
# Attention, and PatchEmbed with its VisionTransformer.


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
# Attention timm writes out (no SDPA call): the same preprocessing, then our kernel.


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
        bias = as_batch_bias(bias + mask.unsqueeze(1), B_)  # (B_, H, N, N)
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


# ---------------------------------------------------------------------------------------------
# timm's rows: the ViT's patch embedding with its prefix tokens and positions, then the attentions.

TIMM_VIT = "timm.models.vision_transformer"
ROWS: tuple[SwapTarget, ...] = (
    SwapTarget(
        library="timm", module_name=TIMM_VIT, class_name="VisionTransformer", swap_argument="patch_embed",
        becomes=f"{PATCH_EMBED_DONE} (prefix tokens (class, distillation, registers) and positions in the call; with "
        "a norm after the projection, the projection, then the rest as timm's), and _pos_embed keeps only pos_drop",
        why_left_alone=timm_vit_patch_embed_problem, instance_patches=timm_vit_patch_embed_patch,
        reported_submodule="patch_embed", also_swaps=("patch_embed",), report_kind="timm PatchEmbed + cls_token + pos_embed",
    ),
    SwapTarget(
        library="timm", module_name="timm.layers.patch_embed", class_name="PatchEmbed", swap_argument="patch_embed",
        becomes=f"{PATCH_EMBED_DONE}: the projection (tokens, or viewed as NHWC / NCHW for hierarchical models), then its norm",
        why_left_alone=timm_patch_embed_problem, instance_patches=timm_patch_embed_patch,
    ),
    SwapTarget(
        library="timm", module_name="timm.layers.attention", class_name="Attention", swap_argument="attention",
        becomes=f"{ATTENTION_DONE} on views of the qkv projection (q_norm/k_norm, attn_mask, is_causal as timm's)",
        why_left_alone=timm_attention_problem, instance_patches=timm_attention_patch,
    ),
    redirected_row(library="timm", module_name="timm.layers.attention", class_name="AttentionRope",
                   becomes="RoPE on q, k (prefix tokens skipped) as timm's"),
    redirected_row(library="timm", module_name="timm.models.eva", class_name="EvaAttention",
                   becomes="EVA-02 / PE / rope ViT: q/k norms and RoPE on q, k (prefix tokens skipped) as timm's"),
    redirected_row(library="timm", module_name="timm.models.beit", class_name="Attention",
                   becomes="BEiT / BEiTv2: relative-position bias as a float bias, with its gradient"),
    redirected_row(library="timm", module_name="timm.models.vision_transformer_relpos", class_name="RelPosAttention",
                   becomes="relative-position bias as a float bias"),
    redirected_row(library="timm", module_name="timm.models.swin_transformer", class_name="WindowAttention",
                   becomes="Swin: windows as the batch, relative-position bias + shift mask as a float bias"),
    redirected_row(library="timm", module_name="timm.models.cait", class_name="ClassAttn",
                   becomes="CaiT class attention: one query (Nq = 1)"),
    redirected_row(library="timm", module_name="timm.layers.attention_pool", class_name="AttentionPoolLatent",
                   becomes="attention pooling (MAP head): latent queries"),
    redirected_row(library="timm", module_name="timm.models.pvt_v2", class_name="Attention",
                   becomes="PVTv2: spatially reduced keys and values (Nk < Nq)"),
    redirected_row(library="timm", module_name="timm.models.twins", class_name="LocallyGroupedAttn",
                   becomes="Twins: local windows as the batch"),
    redirected_row(library="timm", module_name="timm.models.twins", class_name="GlobalSubSampleAttn",
                   becomes="Twins: sub-sampled keys and values (Nk < Nq)"),
    redirected_row(library="timm", module_name="timm.models.maxxvit", class_name="Attention2d",
                   becomes="MaxViT / CoAtNet: relative-position bias, NCHW"),
    redirected_row(library="timm", module_name="timm.models.maxxvit", class_name="AttentionCl",
                   becomes="MaxViT: block and grid partitions as the batch, relative bias"),
    redirected_row(library="timm", module_name="timm.models.vision_transformer_sam", class_name="Attention",
                   becomes="SAM-ViT: windows as the batch, decomposed relative positions as a float bias"),
    redirected_row(library="timm", module_name="timm.models.tiny_vit", class_name="Attention",
                   becomes="TinyViT: attention-bias table, value dim != key dim"),
    redirected_row(library="timm", module_name="timm.models.davit", class_name="WindowAttention",
                   becomes="DaViT: windows as the batch"),
    redirected_row(library="timm", module_name="timm.models.fastvit", class_name="Attention",
                   becomes="FastViT: last-stage attention on the flattened map"),
    redirected_row(library="timm", module_name="timm.models.hiera", class_name="MaskUnitAttention",
                   becomes="Hiera: mask units as the batch, pooled q (Nq < Nk)"),
    redirected_row(library="timm", module_name="timm.models.hieradet_sam2", class_name="MultiScaleAttention",
                   becomes="SAM2 Hiera: pooled q (Nq < Nk)"),
    redirected_row(library="timm", module_name="timm.models.nest", class_name="Attention",
                   becomes="NesT: blocks as the batch"),
    redirected_row(library="timm", module_name="timm.models.visformer", class_name="Attention",
                   becomes="Visformer: 1x1-conv projections"),
    SwapTarget(
        library="timm", module_name="timm.models.swin_transformer_v2", class_name="WindowAttention", swap_argument="attention",
        becomes=f"{ATTENTION_DONE}: Swin V2 cosine attention: normalised q, k with the per-head logit scale folded into q "
        "(scale 1); CPB-MLP bias + shift mask as a float bias; windows as the batch",
        why_left_alone=timm_swinv2_problem, instance_patches=written_out_patch(timm_swinv2_window_attention_forward),
    ),
    written_row(library="timm", module_name="timm.models.crossvit", class_name="CrossAttention",
                forward=timm_crossvit_cross_attention_forward,
                becomes="CrossViT cross attention: the class token (Nq = 1) attends the other branch's tokens"),
    written_row(library="timm", module_name="timm.models.convit", class_name="MHSA",
                forward=timm_convit_mhsa_forward, becomes="ConViT's non-local MHSA layers"),
    written_row(library="timm", module_name="timm.models.levit", class_name="Attention",
                forward=timm_levit_attention_forward,
                becomes="LeViT: attention-bias table as a float bias, value dim != key dim"),
    written_row(library="timm", module_name="timm.models.levit", class_name="AttentionDownsample",
                forward=timm_levit_attention_downsample_forward,
                becomes="LeViT: sub-sampled queries (Nq < Nk), attention-bias table as a float bias"),
    SwapTarget(
        library="timm", module_name="timm.models.mvitv2", class_name="MultiScaleAttention", swap_argument="attention",
        becomes=f"{ATTENTION_DONE}: MViTv2: pooled q, k, v (Nq < Nk); decomposed relative positions as a float bias",
        why_left_alone=timm_mvitv2_problem, instance_patches=written_out_patch(timm_mvitv2_attention_forward),
    ),
    written_row(library="timm", module_name="timm.models.efficientvit_msra", class_name="CascadedGroupAttention",
                forward=timm_cascaded_group_attention_forward,
                becomes="EfficientViT-M: cascaded heads, one call per head (each head's input adds the previous output)"),
    left_out_row(library="timm", module_name="timm.models.xcit", class_name="XCA",
                 why="cross-covariance attention: a softmax over channels, not over tokens"),
    left_out_row(library="timm", module_name="timm.models.cait", class_name="TalkingHeadAttn",
                 why="talking heads mix the heads' logits before and after the softmax"),
    left_out_row(library="timm", module_name="timm.models.convit", class_name="GPSA",
                 why="gated positional self-attention: a gated sum of two softmaxes"),
    left_out_row(library="timm", module_name="timm.models.efficientvit_mit", class_name="LiteMLA",
                 why="EfficientViT-B: ReLU linear attention, no softmax"),
    left_out_row(library="timm", module_name="timm.layers.diff_attention", class_name="DiffAttention",
                 why="differential attention: the difference of two softmaxes"),
    left_out_row(
        library="timm", module_name="timm.models.naflexvit", class_name="NaFlexEmbeds", swap_argument="patch_embed",
        why="NaFlexViT's embedding takes pre-patchified tokens of any count with per-token grid coordinates and "
        "resamples its position embedding per image; kernels.patch_embed takes whole images of one size",
    ),
)
