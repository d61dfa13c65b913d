"""PyTorch's and torchvision's attention and patch embeddings on our kernels, and their rows.

``nn.MultiheadAttention`` (self- or cross-attention, with its masks; calls that ask for the weights
run the original) and ``nn.TransformerEncoderLayer`` (its ``self_attn``, with PyTorch's fused fast
path turned off so that it runs). torchvision's ``VisionTransformer`` puts ``conv_proj``, the class
token and the encoder's position embedding into one ``kernels.patch_embed`` call; its encoder
layers are ``nn.MultiheadAttention``. Swin (V1 and V2) runs its own forward with
``shifted_window_attention`` replaced by the copy here (redirect.py's ``extra``), MaxViT a copy of
its attention forward: the windows or partitions as the batch, the biases as one float bias.
"""

from __future__ import annotations

import inspect
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from kernels import dispatch
from kernels.swap.redirect import redirected
from kernels.swap.rows import (
    ATTENTION_DONE,
    PATCH_EMBED_DONE,
    Site,
    SwapTarget,
    as_batch_bias,
    bound,
    head_dim_problem,
    is_patch_conv,
    overrides,
    patched_elsewhere,
    written_row,
)

# ---------------------------------------------------------------------------------------------
# torch.nn.MultiheadAttention and nn.TransformerEncoderLayer.


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


# ---------------------------------------------------------------------------------------------
# torchvision: VisionTransformer, Swin, MaxViT.


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
        bias = as_batch_bias(bias + attn_mask.unsqueeze(1), x.size(0))  # (B * nW, heads, N, N)
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


# ---------------------------------------------------------------------------------------------
# torch's and torchvision's rows.

TV = "torchvision.models"
ROWS: tuple[SwapTarget, ...] = (
    SwapTarget(
        library="torch", module_name="torch.nn", class_name="TransformerEncoderLayer", swap_argument="attention",
        becomes=f"{ATTENTION_DONE} (self_attn; PyTorch's fused fast path turned off so that it runs)",
        why_left_alone=transformer_encoder_layer_problem, instance_patches=transformer_encoder_layer_patch,
        reported_submodule="self_attn", also_swaps=("self_attn",),
    ),
    SwapTarget(
        library="torch", module_name="torch.nn", class_name="MultiheadAttention", swap_argument="attention",
        becomes=f"{ATTENTION_DONE} (self- or cross-attention, with masks; calls with need_weights=True run the original)",
        why_left_alone=multihead_attention_problem, instance_patches=multihead_attention_patch,
    ),
    SwapTarget(
        library="torchvision", module_name=f"{TV}.vision_transformer", class_name="VisionTransformer",
        swap_argument="patch_embed",
        becomes=f"{PATCH_EMBED_DONE}: conv_proj + class_token + encoder.pos_embedding in one call",
        why_left_alone=torchvision_vit_problem, instance_patches=torchvision_vit_patch,
        report_kind="torchvision VisionTransformer conv_proj + class_token + encoder.pos_embedding",
    ),
    SwapTarget(
        library="torchvision", module_name=f"{TV}.swin_transformer", class_name="ShiftedWindowAttentionV2",
        swap_argument="attention",
        becomes=f"{ATTENTION_DONE}: Swin V2 cosine attention (normalised q, k, per-head logit scale folded into q, scale 1); "
        "relative bias + shift mask as a float bias; windows as the batch",
        why_left_alone=torchvision_swin_problem, instance_patches=torchvision_swin_patch,
    ),
    SwapTarget(
        library="torchvision", module_name=f"{TV}.swin_transformer", class_name="ShiftedWindowAttention",
        swap_argument="attention",
        becomes=f"{ATTENTION_DONE}: relative-position bias + shift mask as a float bias; windows as the batch",
        why_left_alone=torchvision_swin_problem, instance_patches=torchvision_swin_patch,
    ),
    written_row(library="torchvision", module_name=f"{TV}.maxvit", class_name="RelativePositionalMultiHeadAttention",
                forward=torchvision_maxvit_attention_forward,
                becomes="MaxViT: block and grid partitions as the batch, relative-position bias as a float bias"),
)
