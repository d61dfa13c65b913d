"""timm's VisionTransformer weights in and out of ``vit.ViT``.

Our parameter names are timm's, with two differences, so the conversion is short:

    timm                              vit.ViT
    cls_token  (1, 1, E)              patch_embed.cls_token
    pos_embed  (1, [1 +] N, E)        patch_embed.pos_embed
    patch_embed.proj.weight           patch_embed.proj.weight: the same (E, C, P, P) for the Conv2d
      (E, C, P, P), a Conv2d            form; (E, P*P*C) with columns in (s1 s2 c) order for the
                                        tutorial's Linear form (the einops patches are (s1 s2 c))

Everything else (``blocks.i.norm1``, ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``norm``, ``head``)
has the same name and layout. Options of timm's model that ``vit.ViT`` cannot express exactly
are a ValueError naming the option, never a silently different model: above all
``global_pool='avg'``, whose LayerNorm comes after the pooling (``fc_norm``) while ours comes
before it (timm's ``fc_norm=False`` is ours, exactly).

    ours = vit.timm_weights.from_timm(timm_model)            # a ViT with timm's config and weights
    vit.timm_weights.check_state_dict(our_state_dict, config)  # our names and shapes, or a ValueError
    vit.timm_weights.load_timm_weights(model, timm_model.state_dict())
    timm_model.load_state_dict(to_timm_state_dict(model.state_dict(), model.config))
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vit.model import ViT, ViTConfig

# Keys of timm's state dict that belong to options vit.ViT does not have, and the option's name.
_UNSUPPORTED_KEYS = (
    ("fc_norm.", "global_pool='avg' with its LayerNorm after the pooling (fc_norm; use fc_norm=False)"),
    ("reg_token", "reg_tokens (register tokens)"),
    ("norm_pre.", "pre_norm=True (a LayerNorm before the blocks)"),
    ("attn_pool.", "global_pool='map' or 'prr' (attention pooling)"),
    ("patch_embed.norm.", "embed_norm_layer (a norm inside the patch embedding)"),
    (".ls1.", "init_values (layer scale)"),
    (".ls2.", "init_values (layer scale)"),
    (".attn.q_norm.", "qk_norm=True"),
    (".attn.k_norm.", "qk_norm=True"),
    (".attn.norm.", "scale_attn_norm=True"),
    (".attn.gate.", "a gated attention"),
    (".mlp.norm.", "scale_mlp_norm=True"),
)


def _expected_state_dict(config: ViTConfig, form: str | None = None) -> dict[str, torch.Size]:
    """Our parameter names and shapes for this config, from a model built on the meta device."""
    if form is not None:
        config = dataclasses.replace(config, patch_embedding=form)
    with torch.device("meta"):
        model = ViT(config, fused=False)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def _first_names(names: list[str], shown: int = 3) -> str:
    """``names`` for a one-line message: a wrong depth misses a dozen names per block."""
    if not names:
        return "none"
    if len(names) <= shown:
        return str(names)
    return f"{names[:shown]} and {len(names) - shown} more"


def _check_keys(where: str, converted: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> None:
    missing = [name for name in expected if name not in converted]
    unexpected = [name for name in converted if name not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{where}: the state dict does not fit this ViTConfig: missing {_first_names(missing)}, "
            f"unexpected {_first_names(unexpected)}"
        )
    for name, shape in expected.items():
        if converted[name].shape != shape:
            raise ValueError(f"{where}: expected {name} of shape {tuple(shape)}, got {tuple(converted[name].shape)}")


def check_state_dict(state_dict: dict[str, torch.Tensor], config: ViTConfig, *, where: str = "check_state_dict") -> None:
    """Whether ``state_dict`` has our names and shapes for ``config``: a ValueError names the
    missing and unexpected names, else the first tensor of another shape."""
    _check_keys(where, dict(state_dict), _expected_state_dict(config))


def _linear_from_conv(weight: torch.Tensor) -> torch.Tensor:
    """Conv2d weight (E, C, P, P) -> the Linear form's (E, P*P*C), columns in (s1 s2 c) order."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _conv_from_linear(weight: torch.Tensor, config: ViTConfig) -> torch.Tensor:
    """The Linear form's (E, P*P*C) -> a contiguous Conv2d weight (E, C, P, P)."""
    p, c = config.patch_size, config.in_channels
    return weight.reshape(weight.shape[0], p, p, c).permute(0, 3, 1, 2).contiguous()


def from_timm_state_dict(
    state_dict: dict[str, torch.Tensor], config: ViTConfig, *, where: str = "from_timm_state_dict"
) -> dict[str, torch.Tensor]:
    """timm VisionTransformer state dict -> ours for ``config``; tensors are shared where no layout
    changes. ``where`` begins the message of a ValueError (the file the state dict came from, say)."""
    for name in state_dict:
        for marker, option in _UNSUPPORTED_KEYS:
            if marker in name:
                raise ValueError(f"{where}: timm's {option} has no exact counterpart in vit.ViT (found {name!r})")
    converted = {}
    for name, tensor in state_dict.items():
        if name in ("cls_token", "pos_embed"):
            converted[f"patch_embed.{name}"] = tensor
        elif name == "patch_embed.proj.weight" and config.patch_embedding == "linear":
            converted[name] = _linear_from_conv(tensor)
        else:
            converted[name] = tensor
    expected = _expected_state_dict(config)
    pos = converted.get("patch_embed.pos_embed")
    wanted = expected["patch_embed.pos_embed"]
    if config.class_token and pos is not None and pos.shape[1] == wanted[1] - 1:
        # timm's no_embed_class=True: the class token has no position embedding; ours always adds one.
        raise ValueError(
            f"{where}: timm's no_embed_class=True (pos_embed {tuple(pos.shape)} without the class token's row) "
            f"has no exact counterpart in vit.ViT, which expects {tuple(wanted)}"
        )
    _check_keys(where, converted, expected)
    return converted


def to_timm_state_dict(our_state_dict: dict[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """Our state dict for ``config`` -> timm VisionTransformer's (``global_pool`` 'token', or 'avg' with
    ``fc_norm=False`` when ``config.pool == 'mean'``)."""
    check_state_dict(our_state_dict, config, where="to_timm_state_dict")
    converted = {}
    for name, tensor in our_state_dict.items():
        if name in ("patch_embed.cls_token", "patch_embed.pos_embed"):
            converted[name.removeprefix("patch_embed.")] = tensor
        elif name == "patch_embed.proj.weight" and config.patch_embedding == "linear":
            converted[name] = _conv_from_linear(tensor, config)
        else:
            converted[name] = tensor
    return converted


def load_timm_weights(model: ViT, timm_state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a timm VisionTransformer's weights into ``model`` (in place, every parameter, strictly)."""
    if not isinstance(model, ViT):
        raise TypeError(f"load_timm_weights: expected a vit.ViT, got {type(model).__name__}")
    model.load_state_dict(from_timm_state_dict(timm_state_dict, model.config))


def _unsupported(option: str) -> ValueError:
    return ValueError(f"config_from_timm: timm's {option} has no exact counterpart in vit.ViT")


def _is_exact_gelu(module: nn.Module) -> bool:
    return type(module) is nn.GELU and module.approximate == "none"


def _single(values: set, what: str):
    if len(values) != 1:
        raise _unsupported(f"{what} differing between layers ({sorted(values)})")
    return values.pop()


def config_from_timm(timm_model: nn.Module) -> ViTConfig:
    """The ViTConfig of a timm ``VisionTransformer``; a ValueError names the first option ours lacks."""
    from timm.layers import Mlp, PatchEmbed
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(timm_model, VisionTransformer):
        raise TypeError(f"config_from_timm: expected a timm VisionTransformer, got {type(timm_model).__name__}")
    m = timm_model
    pe = m.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.proj, nn.Conv2d):
        raise _unsupported(f"embed_layer {type(pe).__name__}")
    if not isinstance(pe.norm, nn.Identity):
        raise _unsupported("embed_norm_layer (a norm inside the patch embedding)")
    if pe.proj.bias is None:
        raise _unsupported("pre_norm=True (its patch embedding has no bias)")
    if pe.img_size is None or pe.img_size[0] != pe.img_size[1] or pe.patch_size[0] != pe.patch_size[1]:
        raise _unsupported(f"non-square img_size {pe.img_size} or patch_size {pe.patch_size}")
    if m.dynamic_img_size or pe.dynamic_img_pad:
        raise _unsupported("dynamic_img_size/dynamic_img_pad (timm's own position-embedding resampling)")
    if m.reg_token is not None:
        raise _unsupported(f"reg_tokens={m.num_reg_tokens}")
    if m.pos_embed is None:
        raise _unsupported("pos_embed='none'")
    if m.no_embed_class and m.cls_token is not None:
        raise _unsupported("no_embed_class=True with a class token")
    if not isinstance(m.norm_pre, nn.Identity):
        raise _unsupported("pre_norm=True")
    if not isinstance(m.patch_drop, nn.Identity):
        raise _unsupported("patch_drop_rate > 0")
    if m.pos_drop.p or m.head_drop.p:
        raise _unsupported(f"pos_drop_rate={m.pos_drop.p} / drop_rate={m.head_drop.p} (dropouts ViT does not have)")
    if m.attn_pool is not None:
        raise _unsupported(f"global_pool={m.global_pool!r}")
    if m.global_pool == "token":
        pool = "token"
    elif m.global_pool == "avg" and not m.pool_include_prefix:
        pool = "mean"
    else:
        raise _unsupported(f"global_pool={m.global_pool!r}")
    if not isinstance(m.fc_norm, nn.Identity):
        raise _unsupported(f"global_pool={m.global_pool!r} with its LayerNorm after the pooling (fc_norm; use fc_norm=False)")
    if not isinstance(m.norm, nn.LayerNorm):
        raise _unsupported("final_norm=False or a norm_layer other than LayerNorm")

    blocks = list(m.blocks)
    if not blocks:
        raise _unsupported("depth=0")
    eps, dropouts, attn_dropouts, hidden, qkv_bias, heads = set(), set(), set(), set(), set(), set()
    for block in blocks:
        if type(block) is not Block:
            raise _unsupported(f"block_fn {type(block).__name__}")
        attn, mlp = block.attn, block.mlp
        if type(attn) is not Attention:
            raise _unsupported(f"attn_layer {type(attn).__name__}")
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
            raise _unsupported("qk_norm=True")
        if not isinstance(attn.norm, nn.Identity):
            raise _unsupported("scale_attn_norm=True")
        if getattr(attn, "gate", None) is not None:
            raise _unsupported("a gated attention")
        if attn.proj.bias is None:
            raise _unsupported("proj_bias=False")
        if attn.head_dim * attn.num_heads != m.embed_dim:
            raise _unsupported(f"attn_head_dim={attn.head_dim} (ours is embed_dim // num_heads)")
        if not (isinstance(block.ls1, nn.Identity) and isinstance(block.ls2, nn.Identity)):
            raise _unsupported("init_values (layer scale)")
        if not (isinstance(block.drop_path1, nn.Identity) and isinstance(block.drop_path2, nn.Identity)):
            raise _unsupported("drop_path_rate > 0 (stochastic depth)")
        if type(mlp) is not Mlp:
            raise _unsupported(f"mlp_layer {type(mlp).__name__}")
        if not _is_exact_gelu(mlp.act):
            raise _unsupported(f"act_layer {mlp.act!r} (ours is nn.GELU, exact erf)")
        if not isinstance(mlp.norm, nn.Identity):
            raise _unsupported("scale_mlp_norm=True")
        for norm in (block.norm1, block.norm2):
            if not isinstance(norm, nn.LayerNorm):
                raise _unsupported(f"norm_layer {type(norm).__name__}")
            eps.add(norm.eps)
        if attn.proj_drop.p != mlp.drop1.p or mlp.drop1.p != mlp.drop2.p:
            raise _unsupported("different dropout rates after the attention and in the MLP")
        dropouts.add(mlp.drop1.p)
        attn_dropouts.add(attn.attn_drop.p)
        hidden.add(mlp.fc1.out_features)
        qkv_bias.add(attn.qkv.bias is not None)
        heads.add(attn.num_heads)
    eps.add(m.norm.eps)
    hidden_features = _single(hidden, "mlp hidden size")
    mlp_ratio = hidden_features / m.embed_dim
    if int(m.embed_dim * mlp_ratio) != hidden_features:
        raise _unsupported(f"an MLP hidden size {hidden_features} that embed_dim * mlp_ratio cannot give")
    return ViTConfig(
        image_size=pe.img_size[0],
        patch_size=pe.patch_size[0],
        in_channels=pe.proj.in_channels,
        embed_dim=m.embed_dim,
        depth=len(blocks),
        num_heads=_single(heads, "num_heads"),
        mlp_ratio=mlp_ratio,
        num_classes=m.num_classes,
        qkv_bias=_single(qkv_bias, "qkv_bias"),
        dropout=_single(dropouts, "proj_drop_rate"),
        attn_dropout=_single(attn_dropouts, "attn_drop_rate"),
        class_token=m.cls_token is not None,
        pool=pool,
        layer_norm_eps=_single(eps, "LayerNorm eps"),
    )


def from_timm(timm_model: nn.Module, *, form: str = "conv", fused: bool | None = None) -> ViT:
    """A ``vit.ViT`` computing what ``timm_model`` computes, with a copy of its weights.

    ``form`` picks our patch embedding ("conv" or the tutorial's "linear"); ``fused`` is the flag.
    The new model has the timm model's device, dtype and train/eval mode.
    """
    config = dataclasses.replace(config_from_timm(timm_model), patch_embedding=form)
    weight = timm_model.patch_embed.proj.weight
    # Built in the timm model's dtype before loading: a float32 detour would round float64 weights.
    model = ViT(config, fused=fused).to(device=weight.device, dtype=weight.dtype).train(timm_model.training)
    load_timm_weights(model, timm_model.state_dict())
    return model
