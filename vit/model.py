"""The Vision Transformer, built step by step as in the tutorial, with the tutorial's bugs fixed.

    image (B, 3, 224, 224)
      -> PatchEmbedding: 16x16 patches, each projected to E, a class token prepended,
         position embeddings added                                  (B, 1 + 196, E)
      -> depth x EncoderBlock: x + MultiHeadAttention(norm(x)), x + FeedForward(norm(x))
      -> final norm, the class token (or the mean of the patch tokens), a Linear head
    logits (B, num_classes)

One flag, ``fused``, picks the path. A module built with ``fused=True`` calls ``kernels.attention``
and ``kernels.patch_embed`` with ``backend=None``: the backend of the calling thread decides
(``kernels.use_backend(name)``, else ``VITRITON_BACKEND``; "auto" is Triton where it can take the
input). With ``fused=False`` attention calls ``kernels.attention(..., backend="einsum")``, the
einsum reference, and the patch embedding runs the tutorial's nn modules. The flag is a
constructor argument kept as a typed attribute (``fused: Final[bool]``), as timm's
``fused_attn`` is; its default is ``kernels.fused_by_default()``, read when the module is built.
``torch.jit.script`` compiles ``fused=False`` models (the einsum reference written out below);
a fused one refuses in one line. Parameter names follow timm's where they mean the same thing
(``qkv``, ``proj``, ``norm1``, ``mlp.fc1``, ...), so timm checkpoints map onto this model.
"""

import dataclasses
import itertools
import math
from typing import Final

import torch
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from torch import nn

import kernels
from kernels.checks import is_real
from kernels.reference import safe_softmax


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """The shape of a ViT. Every field is checked: a wrong type is a TypeError naming it, a bad
    value a ValueError. Real-valued fields take any real number but bool and are stored as floats."""

    image_size: int = 224  # the side the position embeddings are made for
    patch_size: int = 16
    in_channels: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # 0: no head, forward returns the pooled features
    qkv_bias: bool = True
    dropout: float = 0.0  # after the MLP and the attention's output projection
    attn_dropout: float = 0.0  # on the attention weights
    class_token: bool = True
    pool: str = "token"  # "token": the class token; "mean": the mean of the patch tokens
    patch_embedding: str = "conv"  # "conv": Conv2d; "linear": einops Rearrange then nn.Linear
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("image_size", "patch_size", "in_channels", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"ViTConfig.{name} must be a positive int, got {value!r}")
            if value <= 0:
                raise ValueError(f"ViTConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool):
            raise TypeError(f"ViTConfig.num_classes must be an int >= 0, got {self.num_classes!r}")
        if self.num_classes < 0:
            raise ValueError(f"ViTConfig.num_classes must be an int >= 0, got {self.num_classes!r}")
        for name in ("qkv_bias", "class_token"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ViTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name, expected, ok in (
            ("mlp_ratio", "a positive finite number", lambda x: 0 < x < math.inf),
            ("layer_norm_eps", "a positive finite number", lambda x: 0 < x < math.inf),
            ("dropout", "a number in [0, 1)", lambda x: 0 <= x < 1),
            ("attn_dropout", "a number in [0, 1)", lambda x: 0 <= x < 1),
        ):
            value = getattr(self, name)
            if not is_real(value):
                raise TypeError(f"ViTConfig.{name} must be {expected}, got {value!r}")
            if not ok(value):  # NaN fails every comparison
                raise ValueError(f"ViTConfig.{name} must be {expected}, got {value!r}")
            object.__setattr__(self, name, float(value))  # an int or NumPy number stored as a float
        for name, choices in (("pool", ("token", "mean")), ("patch_embedding", ("conv", "linear"))):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"ViTConfig.{name} must be {choices[0]!r} or {choices[1]!r}, got {value!r}")
            if value not in choices:
                raise ValueError(f"ViTConfig.{name} must be {choices[0]!r} or {choices[1]!r}, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"ViTConfig.embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ViTConfig.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if int(self.embed_dim * self.mlp_ratio) < 1:
            raise ValueError(
                f"ViTConfig.mlp_ratio ({self.mlp_ratio!r}) times embed_dim ({self.embed_dim}) must give an MLP "
                "of at least 1 unit"
            )
        if self.pool == "token" and not self.class_token:
            raise ValueError("ViTConfig.pool='token' needs class_token=True; use pool='mean' without one")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# ---------------------------------------------------------------------------------------------
# Steps 2-4: patches, their projection, the class token and the position embeddings.


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """Resize learned position embeddings (1, prefix + h*w, E) to another patch grid, bicubic.

    The class token's embedding has no place in the grid, so it is kept apart and unchanged.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    side = int(math.sqrt(grid.shape[1]) + 0.5)  # the grid it was made for is square
    height, width = new_grid[0], new_grid[1]
    if height < 1 or width < 1:
        raise ValueError(f"resample_pos_embed: expected a grid of at least 1x1 patches, got {height}x{width}")
    if height == side and width == side:
        return pos_embed
    embed_dim = grid.shape[2]
    grid = grid.reshape(1, side, side, embed_dim).permute(0, 3, 1, 2)  # (1, E, h, w)
    grid = F.interpolate(grid.float(), size=[height, width], mode="bicubic", align_corners=False).to(pos_embed.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(1, height * width, embed_dim)  # (1, h' * w', E)
    return torch.cat([prefix, grid], dim=1)


def _refuse_script_when_fused(module: nn.Module) -> nn.Module:
    """``torch.jit.script`` calls this on every module before compiling it (as
    ``__prepare_scriptable__``): the kernels' Python checks and the per-thread backend do not
    compile, so a fused module says so in one line instead of a TorchScript trace."""
    if module.fused:
        raise RuntimeError(
            f"{type(module).__name__}(fused=True): torch.jit.script supports fused=False models; "
            "build with fused=False or use torch.compile"
        )
    return module


class PatchEmbedding(nn.Module):
    """Image (B, C, H, W) -> tokens (B, [1 +] N, E), N = (H / P) * (W / P).

    ``form="linear"`` is the tutorial's first version: cut P x P patches with einops
    (``b c (h s1) (w s2) -> b (h w) (s1 s2 c)``) and project them with ``nn.Linear``.
    ``form="conv"`` is its second: a Conv2d with kernel and stride P, then flatten. They compute
    the same thing: the Linear's columns in (s1 s2 c) order are the Conv2d's (c, s1, s2) weight.
    """

    fused: Final[bool]
    __prepare_scriptable__ = _refuse_script_when_fused

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        embed_dim: int = 768,
        class_token: bool = True,
        form: str = "conv",
        fused: bool | None = None,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"PatchEmbedding: image_size {image_size} must be a multiple of patch_size {patch_size}")
        self.patch_size, self.in_channels, self.embed_dim, self.form = patch_size, in_channels, embed_dim, form
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.fused = kernels.fused_by_default() if fused is None else fused
        if form == "linear":
            self.patches = Rearrange("b c (h s1) (w s2) -> b (h w) (s1 s2 c)", s1=patch_size, s2=patch_size)
            self.proj = nn.Linear(patch_size * patch_size * in_channels, embed_dim)
            self.flatten = nn.Identity()
        elif form == "conv":
            self.patches = nn.Identity()
            self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
            self.flatten = Rearrange("b e h w -> b (h w) e")
        else:
            raise ValueError(f"PatchEmbedding: form must be 'conv' or 'linear', got {form!r}")
        self.num_prefix_tokens = int(class_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.grid[0] * self.grid[1], embed_dim))

    def conv_weight(self) -> torch.Tensor:
        """The projection as a Conv2d weight (E, C, P, P): for the Linear form, a view, not a copy."""
        if self.form == "conv":
            return self.proj.weight
        p = self.patch_size
        return self.proj.weight.view(self.embed_dim, p, p, self.in_channels).permute(0, 3, 1, 2)

    def pos_embed_for(self, height: int, width: int) -> torch.Tensor:
        """The position embeddings for an image of this size, resampled when its grid differs."""
        p = self.patch_size
        if height < p or width < p:
            raise ValueError(f"PatchEmbedding: expected images of at least one patch, {p}x{p} pixels, got {height}x{width}")
        if height % p or width % p:
            raise ValueError(f"PatchEmbedding: image sides must be multiples of the patch size {p}, got {height}x{width}")
        return resample_pos_embed(self.pos_embed, (height // p, width // p), self.num_prefix_tokens)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript checks the types itself, and has no tuple(shape)
            _check_images(images, self.in_channels)
        pos_embed = self.pos_embed_for(images.shape[-2], images.shape[-1])  # (1, [1 +] N, E)
        if self.fused:
            return kernels.patch_embed(images, self.conv_weight(), self.proj.bias, self.cls_token, pos_embed)
        tokens = self.flatten(self.proj(self.patches(images)))  # (B, N, E)
        if self.cls_token is not None:
            cls_tokens = self.cls_token.expand(images.shape[0], -1, -1)  # (B, 1, E)
            tokens = torch.cat([cls_tokens, tokens], dim=1)  # (B, 1 + N, E)
        return tokens + pos_embed  # out of place, broadcast over the batch


def _check_images(images, in_channels: int) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"PatchEmbedding: expected images to be a tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != in_channels:
        raise ValueError(f"PatchEmbedding: expected images (B, {in_channels}, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"PatchEmbedding: expected floating-point images (uint8 ones: .float() / 255), got {images.dtype}")


# ---------------------------------------------------------------------------------------------
# Step 5: multi-head attention.


class MultiHeadAttention(nn.Module):
    """Tokens (B, N, E) -> (B, N, E): one fused qkv projection, attention per head, output projection.

    ``mask`` (optional) broadcasts to (B, heads, N, N): bool with True = may attend, or float
    added to the logits. The logits are scaled by head_dim**-0.5 before the softmax.
    """

    fused: Final[bool]
    __prepare_scriptable__ = _refuse_script_when_fused

    def __init__(
        self,
        emb_size: int = 768,
        num_heads: int = 8,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        qkv_bias: bool = True,
        fused: bool | None = None,
    ):
        super().__init__()
        if emb_size % num_heads:
            raise ValueError(f"MultiHeadAttention: emb_size {emb_size} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (emb_size // num_heads) ** -0.5
        self.attn_dropout = float(attn_dropout)
        self.fused = kernels.fused_by_default() if fused is None else fused
        self.qkv = nn.Linear(emb_size, 3 * emb_size, bias=qkv_bias)
        # Views into qkv, (3, B, H, N, D): the kernels read q, k and v in place, strides and all.
        self.split_heads = Rearrange("b n (three h d) -> three b h n d", three=3, h=num_heads)
        self.merge_heads = Rearrange("b h n d -> b n (h d)")
        self.proj = nn.Linear(emb_size, emb_size)
        self.proj_drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """``cu_seqlens`` (int32, images + 1): x is (1, total, E), several images' tokens packed
        one after another, and each image's tokens attend only to each other (``ViT.forward_packed``)."""
        if not torch.jit.is_scripting():  # TorchScript checks the types itself, and has no tuple(shape)
            _check_tokens(x, self.qkv.in_features)
        q, k, v = self.split_heads(self.qkv(x)).unbind(0)  # (B, H, N, D) each
        if cu_seqlens is not None and not torch.jit.is_scripting():
            if mask is not None:
                raise ValueError("MultiHeadAttention: expected a mask or cu_seqlens, got both")
            q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))  # (total, H, D) each: views
            out = kernels.attention_varlen(
                q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                scale=self.scale,
                dropout_p=self.attn_dropout if self.training else 0.0,
                backend=None if self.fused else "einsum",
            )  # (total, H, D)
            out = out.transpose(0, 1).unsqueeze(0)  # (1, H, total, D)
        elif torch.jit.is_scripting():  # only fused=False gets here: see _refuse_script_when_fused
            out = self.einsum_attention(q, k, v, mask)
        else:
            out = kernels.attention(
                q, k, v, mask,
                scale=self.scale,
                dropout_p=self.attn_dropout if self.training else 0.0,
                backend=None if self.fused else "einsum",
            )  # (B, H, N, D)
        return self.proj_drop(self.proj(self.merge_heads(out)))  # (B, N, E)

    def einsum_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """What ``kernels.attention(backend="einsum")`` computes, written out for TorchScript, which
        cannot compile the kernels' Python: float16 and bfloat16 in float32, a bool mask's False
        as -inf, a float mask added to the scaled logits, zeros for a query with every key masked
        (``safe_softmax``), the output in v's dtype. Dropout is ``F.dropout``'s own draw."""
        compute = torch.float32 if v.dtype in (torch.float16, torch.bfloat16) else v.dtype
        energy = torch.einsum("bhqd, bhkd -> bhqk", q.to(compute), k.to(compute)) * self.scale  # (B, H, N, N)
        if mask is not None:
            if mask.dtype == torch.bool:
                energy = energy.masked_fill(~mask, float("-inf"))
            else:
                energy = energy + mask.to(compute)
        att = F.dropout(safe_softmax(energy), self.attn_dropout, self.training)  # (B, H, N, N)
        return torch.einsum("bhqk, bhkd -> bhqd", att, v.to(compute)).to(v.dtype)  # (B, H, N, D)


def _check_tokens(x, emb_size: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"MultiHeadAttention: expected tokens to be a tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != emb_size:
        raise ValueError(f"MultiHeadAttention: expected tokens (B, N, {emb_size}), got {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------
# Step 6: the rest: MLP, encoder block, the whole model.


class FeedForward(nn.Sequential):
    """Tokens (B, N, E) -> (B, N, E): Linear to E * ratio, GELU, Linear back, dropout."""

    def __init__(self, emb_size: int = 768, expansion: float = 4.0, dropout: float = 0.0):
        hidden = int(emb_size * expansion)
        super().__init__()
        self.fc1 = nn.Linear(emb_size, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, emb_size)
        self.drop2 = nn.Dropout(dropout)


class EncoderBlock(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + feed-forward(norm(x))."""

    def __init__(self, config: ViTConfig, fused: bool | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.attn = MultiHeadAttention(
            config.embed_dim, config.num_heads, config.dropout, config.attn_dropout, config.qkv_bias, fused=fused
        )
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.mlp = FeedForward(config.embed_dim, config.mlp_ratio, config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask, cu_seqlens, max_seqlen)
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """The whole model: images (B, C, H, W) -> logits (B, num_classes)."""

    fused: Final[bool]
    pool: Final[str]
    __prepare_scriptable__ = _refuse_script_when_fused

    def __init__(self, config: ViTConfig | None = None, fused: bool | None = None, **overrides):
        super().__init__()
        if config is not None and not isinstance(config, ViTConfig):
            raise TypeError(f"ViT: expected config to be a ViTConfig, got {type(config).__name__}")
        config = dataclasses.replace(config or ViTConfig(), **overrides)
        self.config = config
        self.pool = config.pool  # a plain attribute: TorchScript does not compile the dataclass
        self.fused = kernels.fused_by_default() if fused is None else fused
        self.patch_embed = PatchEmbedding(
            config.image_size, config.patch_size, config.in_channels, config.embed_dim,
            class_token=config.class_token, form=config.patch_embedding, fused=self.fused,
        )
        self.blocks = nn.ModuleList(EncoderBlock(config, fused=self.fused) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.embed_dim, config.num_classes) if config.num_classes else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's initialisation: truncated normal (std 0.02) weights, zero biases."""
        nn.init.trunc_normal_(self.patch_embed.pos_embed, std=0.02)
        if self.patch_embed.cls_token is not None:
            nn.init.normal_(self.patch_embed.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_features(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens after the final norm (B, [1 +] N, E)."""
        x = self.patch_embed(images)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, [1 +] N, E) -> logits (B, num_classes): pool, then the Linear head."""
        if self.pool == "token":
            pooled = tokens[:, 0]  # the class token
        else:
            pooled = tokens[:, self.patch_embed.num_prefix_tokens:].mean(dim=1)
        return self.head(pooled)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes); a list of images of different sizes
        runs packed (``forward_packed``)."""
        if not torch.jit.is_scripting() and isinstance(images, (list, tuple)):
            if mask is not None:
                raise ValueError("ViT: a mask applies to a (B, C, H, W) batch, not to a list of images")
            return self.forward_packed(images)
        return self.forward_head(self.forward_features(images, mask))

    @torch.jit.unused
    def forward_packed(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Images of different sizes, each (C, H_i, W_i) or (1, C, H_i, W_i), sides multiples of
        the patch -> logits (len(images), num_classes), equal to running each image alone.

        NaViT-style packing: each image is embedded at its own grid (its position embeddings
        resampled to it, its own class token), the tokens of all images are put one after
        another in one sequence (1, total, E), and every block attends within each image
        through one ``kernels.attention_varlen`` call, no padding and no (total, total) mask.
        """
        if not images:
            raise ValueError("ViT: expected at least one image to pack, got an empty list")
        tokens = []
        for i, image in enumerate(images):
            if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4) or (image.dim() == 4 and image.shape[0] != 1):
                got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
                raise ValueError(f"ViT: expected image {i} of shape (C, H, W) or (1, C, H, W), got {got}")
            patch = self.patch_embed.patch_size
            if image.shape[-2] < patch or image.shape[-1] < patch:
                raise ValueError(
                    f"ViT: expected image {i} to be at least one patch, {patch}x{patch} pixels, got {tuple(image.shape[-2:])}"
                )
            if image.shape[-1] % patch or image.shape[-2] % patch:
                raise ValueError(
                    f"ViT: expected image {i}'s sides to be multiples of the patch size {patch}, got {tuple(image.shape[-2:])}"
                )
            tokens.append(self.patch_embed(image if image.dim() == 4 else image[None])[0])  # (n_i, E)
        lengths = [len(t) for t in tokens]
        starts = [0]
        for length in lengths:
            starts.append(starts[-1] + length)
        x = torch.cat(tokens)[None]  # (1, total, E)
        # Made once per batch on the host: the layers read it with no further sync.
        cu_seqlens = torch.tensor(starts, dtype=torch.int32, device=x.device)
        for block in self.blocks:
            x = block(x, None, cu_seqlens, max(lengths))
        x = self.norm(x)[0]  # (total, E)
        if self.pool == "token":
            pooled = x[starts[:-1]]  # each image's class token: (images, E)
        else:
            prefix = self.patch_embed.num_prefix_tokens
            pooled = torch.stack([x[start + prefix:end].mean(dim=0) for start, end in itertools.pairwise(starts)])
        return self.head(pooled)


# ---------------------------------------------------------------------------------------------
# Presets: timm's names and shapes, plus the tutorial's own.

_TINY = {"embed_dim": 192, "depth": 12, "num_heads": 3}
_SMALL = {"embed_dim": 384, "depth": 12, "num_heads": 6}
_BASE = {"embed_dim": 768, "depth": 12, "num_heads": 12}
_LARGE = {"embed_dim": 1024, "depth": 24, "num_heads": 16}
_HUGE = {"embed_dim": 1280, "depth": 32, "num_heads": 16}

PRESETS: dict[str, ViTConfig] = {
    "vit_tiny_patch16_224": ViTConfig(patch_size=16, image_size=224, **_TINY),
    "vit_tiny_patch16_384": ViTConfig(patch_size=16, image_size=384, **_TINY),
    "vit_small_patch16_224": ViTConfig(patch_size=16, image_size=224, **_SMALL),
    "vit_small_patch16_384": ViTConfig(patch_size=16, image_size=384, **_SMALL),
    "vit_base_patch16_224": ViTConfig(patch_size=16, image_size=224, **_BASE),
    "vit_base_patch16_384": ViTConfig(patch_size=16, image_size=384, **_BASE),
    "vit_base_patch32_224": ViTConfig(patch_size=32, image_size=224, **_BASE),
    "vit_large_patch16_224": ViTConfig(patch_size=16, image_size=224, **_LARGE),
    "vit_large_patch16_384": ViTConfig(patch_size=16, image_size=384, **_LARGE),
    "vit_large_patch32_224": ViTConfig(patch_size=32, image_size=224, **_LARGE),
    "vit_huge_patch14_224": ViTConfig(patch_size=14, image_size=224, **_HUGE),
    # The tutorial's model: 768 wide with 8 heads of 96.
    "vit_tutorial_patch16_224": ViTConfig(patch_size=16, image_size=224, embed_dim=768, depth=12, num_heads=8),
}


def create_model(name: str, fused: bool | None = None, **overrides) -> ViT:
    """``create_model("vit_base_patch16_224", num_classes=10)``: a preset, with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"create_model: unknown model {name!r}; known: {', '.join(PRESETS)}")
    return ViT(PRESETS[name], fused=fused, **overrides)
