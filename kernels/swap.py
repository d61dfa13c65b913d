"""Putting vitriton's kernels into the ViTs people already have: timm, torchvision, Hugging Face, ours.

    report = kernels.swap(model)     # in place, on the model you already built and loaded
    print(report)                    # what it replaced, and what it left alone and why
    report.undo()                    # or kernels.unswap(model): the original forwards, exactly

The Liger-Kernel way: ``forward`` is patched on each recognised *instance* (never on a class),
so the weights stay the very same Parameter objects, ``state_dict()`` keeps its keys and
tensors, checkpoints load and save as before, and other models of the same class are untouched.
Nothing has to happen before the model is built. The patched forwards are plain functions of
the module's own attributes (no state is written during a forward), bound to the module through
a weak reference, so a swapped model still deep-copies and ``del model`` frees it at once.
``torch.compile`` traces them; ``torch.jit.script`` cannot compile them, and says so in one line.

What is recognised is one table, ``TARGETS``: a ``SwapTarget`` per class (found among the
modules already imported: swapping never imports timm, torchvision or transformers for you),
with the check that says why the kernels cannot compute an instance and the patch that puts
them in (``kernels/swap_forwards.py``). The README's swap table is ``swap_table()`` of it.
Attention-like modules no target knows are listed as left alone, so the report is complete.
Swapped modules call with ``backend=None``: Triton where the kernels can take the input, the
einsum fallback otherwise, as ``kernels.use_backend`` / ``VITRITON_BACKEND`` choose.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable

from torch import nn

from kernels import swap_forwards as fw
from kernels.swap_forwards import ATTN_IMPLEMENTATION, HF_ATTENTION_NAME, Site
from kernels.swap_forwards import RECORD as _RECORD

ATTENTION_DONE = "-> kernels.attention"
PATCH_EMBED_DONE = "-> kernels.patch_embed"
NOT_ASKED = "not asked (attention=False or patch_embed=False)"
SCRIPT_HOOK = "__prepare_scriptable__"  # torch.jit.script calls it on each module first: see _RefuseScript


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
    covers: list[str] = dataclasses.field(default_factory=list)  # transformers: the layers (paths below) it switched


class _RefuseScript:
    """A swapped module's ``__prepare_scriptable__``, which ``torch.jit.script`` calls on every module
    before compiling it: the swapped forwards call vitriton's Python dispatch (the per-thread
    backend, the checks, the Triton launches), which TorchScript cannot compile, so scripting a
    swapped model says so in one line instead of a TorchScript trace. Undo removes it."""

    def __init__(self, kind: str):
        self.kind = kind  # the class name only: no reference to the module, so no cycle

    def __call__(self):
        raise RuntimeError(
            f"{self.kind} swapped by kernels.swap: torch.jit.script cannot compile the swapped forwards, which call "
            "vitriton's Python dispatch; use torch.compile, or kernels.unswap(model) before scripting"
        )


def _patch(module: nn.Module, token: object, values: dict) -> None:
    values = {**values, SCRIPT_HOOK: _RefuseScript(type(module).__name__)}
    previous = {name: module.__dict__.get(name, _Absent) for name in values if name != ATTN_IMPLEMENTATION}
    record = _UndoRecord(token, previous)
    for name, value in values.items():
        if name == ATTN_IMPLEMENTATION:  # a transformers model: its attention implementation, switched
            record.attn_implementation = module.config._attn_implementation
            module.set_attn_implementation(value)
        else:
            setattr(module, name, value)
    setattr(module, _RECORD, record)


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


# ---------------------------------------------------------------------------------------------
# The table of swap targets.


@dataclasses.dataclass(frozen=True)
class SwapTarget:
    """One class swap knows: where it lives, which ``swap`` argument asks for it, and how.

    ``problem(site)`` says why the kernels cannot compute this instance exactly (None: they can);
    ``patch(site)`` gives the instance attributes to set, ``{module: {name: value}}``. A target
    with ``left_out`` is never patched: the reason is what the kernels cannot compute.
    """

    library: str  # timm, torch, torchvision, transformers, vit: the report's and README's first word
    module_name: str  # where the class lives; the target is active once that module is imported
    class_name: str
    part: str  # "attention" or "patch_embed"
    runs: str  # how it runs once swapped: the report's note and the README's "becomes"
    problem: Callable[[Site], str | None] | None = None
    patch: Callable[[Site], dict] | None = None
    left_out: str = ""  # never swapped, and why
    at: str = ""  # the submodule the report names (a timm VisionTransformer swaps its patch_embed)
    claims: tuple[str, ...] = ()  # submodules swapped as part of this one, not visited again
    matches: Callable[[nn.Module], bool] | None = None  # instead of a class: a test of the module
    already: Callable[[Site], str | None] | None = None  # a note when it already runs on our kernels
    label: str = ""  # the report's kind, when not "library class"

    @property
    def kind(self) -> str:
        return self.label or f"{self.library} {self.class_name}"


def _redirect(library, module_name, class_name, runs, part="attention", **options) -> SwapTarget:
    """A target whose forward is the library's own, with its one SDPA call on our kernels."""
    return SwapTarget(
        library, module_name, class_name, part, f"{ATTENTION_DONE}: {runs}",
        fw.sdpa_redirect_problem, fw.sdpa_redirect_patch, **options,
    )


def _written(library, module_name, class_name, forward, runs) -> SwapTarget:
    """A target whose library writes its attention out (no SDPA call): ``forward`` is its copy on our kernel."""
    return SwapTarget(
        library, module_name, class_name, "attention", f"{ATTENTION_DONE}: {runs}",
        fw.written_out_problem, fw.written_out_patch(forward),
    )


def _left_out(library, module_name, class_name, why, part="attention") -> SwapTarget:
    return SwapTarget(library, module_name, class_name, part, f"left alone: {why}", left_out=why)


def _vit_already(site: Site) -> str | None:
    if site.module.fused and _RECORD not in site.module.__dict__:
        return "built with fused=True"
    return None


def _vit_problem(site: Site) -> str | None:
    module = site.module
    if hasattr(module, "qkv"):
        return fw.head_dim_problem(module.qkv.in_features // module.num_heads)
    return None


TIMM_VIT = "timm.models.vision_transformer"
TV = "torchvision.models"
HF = "transformers.models"

TARGETS: tuple[SwapTarget, ...] = (
    # timm: the ViT's patch embedding with its prefix tokens and positions, then the attentions.
    SwapTarget(
        "timm", TIMM_VIT, "VisionTransformer", "patch_embed",
        f"{PATCH_EMBED_DONE} (prefix tokens (class, distillation, registers) and positions in the call; with "
        "a norm after the projection, the projection, then the rest as timm's), and _pos_embed keeps only pos_drop",
        fw.timm_vit_patch_embed_problem, fw.timm_vit_patch_embed_patch, at="patch_embed", claims=("patch_embed",),
        label="timm PatchEmbed + cls_token + pos_embed",
    ),
    SwapTarget(
        "timm", "timm.layers.patch_embed", "PatchEmbed", "patch_embed",
        f"{PATCH_EMBED_DONE}: the projection (tokens, or viewed as NHWC / NCHW for hierarchical models), then its norm",
        fw.timm_patch_embed_problem, fw.timm_patch_embed_patch,
    ),
    SwapTarget(
        "timm", "timm.layers.attention", "Attention", "attention",
        f"{ATTENTION_DONE} on views of the qkv projection (q_norm/k_norm, attn_mask, is_causal as timm's)",
        fw.timm_attention_problem, fw.timm_attention_patch,
    ),
    _redirect("timm", "timm.layers.attention", "AttentionRope", "RoPE on q, k (prefix tokens skipped) as timm's"),
    _redirect("timm", "timm.models.eva", "EvaAttention",
              "EVA-02 / PE / rope ViT: q/k norms and RoPE on q, k (prefix tokens skipped) as timm's"),
    _redirect("timm", "timm.models.beit", "Attention", "BEiT / BEiTv2: relative-position bias as a float bias, with its gradient"),
    _redirect("timm", "timm.models.vision_transformer_relpos", "RelPosAttention", "relative-position bias as a float bias"),
    _redirect("timm", "timm.models.swin_transformer", "WindowAttention",
              "Swin: windows as the batch, relative-position bias + shift mask as a float bias"),
    _redirect("timm", "timm.models.cait", "ClassAttn", "CaiT class attention: one query (Nq = 1)"),
    _redirect("timm", "timm.layers.attention_pool", "AttentionPoolLatent", "attention pooling (MAP head): latent queries"),
    _redirect("timm", "timm.models.pvt_v2", "Attention", "PVTv2: spatially reduced keys and values (Nk < Nq)"),
    _redirect("timm", "timm.models.twins", "LocallyGroupedAttn", "Twins: local windows as the batch"),
    _redirect("timm", "timm.models.twins", "GlobalSubSampleAttn", "Twins: sub-sampled keys and values (Nk < Nq)"),
    _redirect("timm", "timm.models.maxxvit", "Attention2d", "MaxViT / CoAtNet: relative-position bias, NCHW"),
    _redirect("timm", "timm.models.maxxvit", "AttentionCl", "MaxViT: block and grid partitions as the batch, relative bias"),
    _redirect("timm", "timm.models.vision_transformer_sam", "Attention",
              "SAM-ViT: windows as the batch, decomposed relative positions as a float bias"),
    _redirect("timm", "timm.models.tiny_vit", "Attention", "TinyViT: attention-bias table, value dim != key dim"),
    _redirect("timm", "timm.models.davit", "WindowAttention", "DaViT: windows as the batch"),
    _redirect("timm", "timm.models.fastvit", "Attention", "FastViT: last-stage attention on the flattened map"),
    _redirect("timm", "timm.models.hiera", "MaskUnitAttention", "Hiera: mask units as the batch, pooled q (Nq < Nk)"),
    _redirect("timm", "timm.models.hieradet_sam2", "MultiScaleAttention", "SAM2 Hiera: pooled q (Nq < Nk)"),
    _redirect("timm", "timm.models.nest", "Attention", "NesT: blocks as the batch"),
    _redirect("timm", "timm.models.visformer", "Attention", "Visformer: 1x1-conv projections"),
    SwapTarget("timm", "timm.models.swin_transformer_v2", "WindowAttention", "attention",
               f"{ATTENTION_DONE}: Swin V2 cosine attention: normalised q, k with the per-head logit scale folded into q "
               "(scale 1); CPB-MLP bias + shift mask as a float bias; windows as the batch",
               fw.timm_swinv2_problem, fw.written_out_patch(fw.timm_swinv2_window_attention_forward)),
    _written("timm", "timm.models.crossvit", "CrossAttention", fw.timm_crossvit_cross_attention_forward,
             "CrossViT cross attention: the class token (Nq = 1) attends the other branch's tokens"),
    _written("timm", "timm.models.convit", "MHSA", fw.timm_convit_mhsa_forward, "ConViT's non-local MHSA layers"),
    _written("timm", "timm.models.levit", "Attention", fw.timm_levit_attention_forward,
             "LeViT: attention-bias table as a float bias, value dim != key dim"),
    _written("timm", "timm.models.levit", "AttentionDownsample", fw.timm_levit_attention_downsample_forward,
             "LeViT: sub-sampled queries (Nq < Nk), attention-bias table as a float bias"),
    SwapTarget("timm", "timm.models.mvitv2", "MultiScaleAttention", "attention",
               f"{ATTENTION_DONE}: MViTv2: pooled q, k, v (Nq < Nk); decomposed relative positions as a float bias",
               fw.timm_mvitv2_problem, fw.written_out_patch(fw.timm_mvitv2_attention_forward)),
    _written("timm", "timm.models.efficientvit_msra", "CascadedGroupAttention", fw.timm_cascaded_group_attention_forward,
             "EfficientViT-M: cascaded heads, one call per head (each head's input adds the previous output)"),
    _left_out("timm", "timm.models.xcit", "XCA", "cross-covariance attention: a softmax over channels, not over tokens"),
    _left_out("timm", "timm.models.cait", "TalkingHeadAttn", "talking heads mix the heads' logits before and after the softmax"),
    _left_out("timm", "timm.models.convit", "GPSA", "gated positional self-attention: a gated sum of two softmaxes"),
    _left_out("timm", "timm.models.efficientvit_mit", "LiteMLA", "EfficientViT-B: ReLU linear attention, no softmax"),
    _left_out("timm", "timm.layers.diff_attention", "DiffAttention", "differential attention: the difference of two softmaxes"),
    _left_out("timm", "timm.models.naflexvit", "NaFlexEmbeds",
              "NaFlexViT's embedding takes pre-patchified tokens of any count with per-token grid coordinates and "
              "resamples its position embedding per image; kernels.patch_embed takes whole images of one size",
              part="patch_embed"),
    # torch and torchvision.
    SwapTarget(
        "torch", "torch.nn", "TransformerEncoderLayer", "attention",
        f"{ATTENTION_DONE} (self_attn; PyTorch's fused fast path turned off so that it runs)",
        fw.transformer_encoder_layer_problem, fw.transformer_encoder_layer_patch, at="self_attn", claims=("self_attn",),
    ),
    SwapTarget(
        "torch", "torch.nn", "MultiheadAttention", "attention",
        f"{ATTENTION_DONE} (self- or cross-attention, with masks; calls with need_weights=True run the original)",
        fw.multihead_attention_problem, fw.multihead_attention_patch,
    ),
    SwapTarget(
        "torchvision", f"{TV}.vision_transformer", "VisionTransformer", "patch_embed",
        f"{PATCH_EMBED_DONE}: conv_proj + class_token + encoder.pos_embedding in one call",
        fw.torchvision_vit_problem, fw.torchvision_vit_patch,
        label="torchvision VisionTransformer conv_proj + class_token + encoder.pos_embedding",
    ),
    SwapTarget(
        "torchvision", f"{TV}.swin_transformer", "ShiftedWindowAttentionV2", "attention",
        f"{ATTENTION_DONE}: Swin V2 cosine attention (normalised q, k, per-head logit scale folded into q, scale 1); "
        "relative bias + shift mask as a float bias; windows as the batch",
        fw.torchvision_swin_problem, fw.torchvision_swin_patch,
    ),
    SwapTarget(
        "torchvision", f"{TV}.swin_transformer", "ShiftedWindowAttention", "attention",
        f"{ATTENTION_DONE}: relative-position bias + shift mask as a float bias; windows as the batch",
        fw.torchvision_swin_problem, fw.torchvision_swin_patch,
    ),
    _written("torchvision", f"{TV}.maxvit", "RelativePositionalMultiHeadAttention", fw.torchvision_maxvit_attention_forward,
             "MaxViT: block and grid partitions as the batch, relative-position bias as a float bias"),
    # transformers: modules that bypass the attention interface, then every layer that reads it.
    SwapTarget(
        "transformers", f"{HF}.vit.modeling_vit", "ViTEmbeddings", "patch_embed",
        f"{PATCH_EMBED_DONE} (bool_masked_pos or interpolate_pos_encoding run the original)",
        fw.vit_embeddings_problem, fw.vit_embeddings_patch,
    ),
    *(
        SwapTarget(
            "transformers", f"{HF}.{module}", name, "attention",
            "-> kernels.attention_varlen (one call per layer over the packed images)",
            fw.qwen_vision_attention_problem, fw.qwen_vision_attention_patch,
        )
        for module, name in (
            ("qwen2_vl.modeling_qwen2_vl", "VisionAttention"),
            ("qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLVisionAttention"),
            ("qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionAttention"),
        )
    ),
    SwapTarget(
        "transformers", f"{HF}.pixtral.modeling_pixtral", "PixtralVisionModel", "attention",
        "cu_seqlens of the packed images instead of its block-diagonal (N, N) mask",
        fw.pixtral_vision_problem, fw.pixtral_vision_patch,
    ),
    SwapTarget(
        "transformers", f"{HF}.pixtral.modeling_pixtral", "PixtralAttention", "attention",
        "-> kernels.attention_varlen over the packed images (kernels.attention when given a mask)",
        fw.pixtral_attention_problem, fw.pixtral_attention_patch,
    ),
    *(
        SwapTarget(
            "transformers", f"{HF}.{module}", name, "attention",
            f"{ATTENTION_DONE}: the probe (Nq = 1) attends the tokens; the weights the head drops are not computed",
            fw.pooling_head_problem, fw.pooling_head_patch, at="attention", claims=("attention",),
        )
        for module, name in (
            ("siglip.modeling_siglip", "SiglipMultiheadAttentionPoolingHead"),
            ("siglip2.modeling_siglip2", "Siglip2MultiheadAttentionPoolingHead"),
        )
    ),
    _redirect("transformers", f"{HF}.aimv2.modeling_aimv2", "Aimv2AttentionPoolingHead", "the class token (Nq = 1) attends the tokens"),
    SwapTarget(
        "transformers", f"{HF}.data2vec.modeling_data2vec_vision", "Data2VecVisionSelfAttention", "attention",
        f"{ATTENTION_DONE}: its SDPA forward, relative-position bias as a float bias (output_attentions runs the original)",
        fw.data2vec_vision_problem, fw.data2vec_vision_patch,
    ),
    SwapTarget(
        "transformers", "transformers", "attention layers of the AttentionInterface", "attention",
        f"{ATTENTION_DONE} (attn_implementation='{HF_ATTENTION_NAME}'; output_attentions=True runs eager)",
        fw.interface_attention_problem, fw.interface_attention_patch,
        matches=fw.reads_attention_interface, already=fw.interface_attention_already,
    ),
    # vit: our own modules have a flag.
    SwapTarget("vit", "vit.model", "MultiHeadAttention", "attention", f"{ATTENTION_DONE} (fused=True)",
               _vit_problem, lambda site: {site.module: {"fused": True}}, already=_vit_already),
    SwapTarget("vit", "vit.model", "PatchEmbedding", "patch_embed", f"{PATCH_EMBED_DONE} (fused=True)",
               _vit_problem, lambda site: {site.module: {"fused": True}}, already=_vit_already),
)


def swap_table() -> str:
    """The README's swap table, from ``TARGETS``: each class, and what it becomes."""
    rows = ["| library | module | becomes |", "|---|---|---|"]
    for target in TARGETS:
        where = target.module_name.rsplit(".", 1)[-1]  # beit.Attention, not every timm Attention
        name = target.class_name if target.matches else f"`{where}.{target.class_name}`"
        rows.append(f"| {target.library} | {name} | {target.runs.replace('|', '/')} |")
    return "\n".join(rows)


# Attention-like modules no target knows: listed as left alone, so the report is complete.
_ATTENTION_WORDS = ("Attention", "Attn", "MHSA", "MHA")
UNKNOWN = "no swap target knows this class: it keeps its own attention"


# ---------------------------------------------------------------------------------------------
# The walk.


class _Walk:
    """One swap: the active targets, the report, the undo token."""

    def __init__(self, model: nn.Module, attention: bool, patch_embed: bool):
        self.model = model
        self.asked = {"attention": attention, "patch_embed": patch_embed}
        self.token = object()
        self.report = SwapReport(model, self.token)
        self.paths = {id(module): path for path, module in model.named_modules()}
        self.claimed: set[int] = set()  # modules swapped as part of their owner
        self.seen: list[str] = []  # paths of every module a target matched
        self.targets = []  # (target, class or None) for the targets whose library is loaded
        for target in TARGETS:
            cls = _loaded_class(target.module_name, target.class_name) if target.matches is None else None
            if cls is not None or (target.matches is not None and target.module_name in sys.modules):
                self.targets.append((target, cls))
        pretrained = _loaded_class("transformers", "PreTrainedModel")
        self.tops: list[tuple[str, nn.Module]] = []  # outermost transformers models
        for path, module in model.named_modules():
            if pretrained is not None and isinstance(module, pretrained) and self.top_pretrained(path)[1] is None:
                self.tops.append((path, module))
        self._model_problems: dict[str, str | None] = {}

    def top_pretrained(self, path: str) -> tuple[str | None, nn.Module | None]:
        """The outermost transformers model holding ``path`` (itself included), or (None, None)."""
        for top_path, top in self.tops:
            if top_path == "" or path == top_path or path.startswith(f"{top_path}."):
                return top_path, top
        return None, None

    def interface_model_problem(self, top_path: str) -> str | None:
        """The switch is model-wide: one layer the kernels cannot take leaves the whole model."""
        if top_path not in self._model_problems:
            _, top = self.top_pretrained(top_path)
            problems = (fw.interface_layer_problem(layer) for layer in top.modules() if fw.reads_attention_interface(layer))
            self._model_problems[top_path] = next((p for p in problems if p), None)
        return self._model_problems[top_path]

    def _match(self, module: nn.Module):
        for target, cls in self.targets:
            if target.matches is not None:
                if target.matches(module):
                    return target, type(module)
            elif isinstance(module, cls):  # subclasses too: each problem() checks what they override
                return target, cls
        return None, None

    def visit(self, path: str, module: nn.Module) -> None:
        if id(module) in self.claimed:
            return
        target, cls = self._match(module)
        if target is None:
            return
        for below in target.claims:
            self.claimed.add(id(module.get_submodule(below)))
        site = Site(path, module, cls, self)
        where = f"{path}.{target.at}" if path and target.at else (target.at or path)
        self.seen.append(where)
        reported = module.get_submodule(target.at) if target.at else module
        kind = f"{target.library} {type(module).__name__}" if target.matches else target.kind
        entry = functools.partial(SwapEntry, where, kind)
        if target.left_out:
            self.report.left_alone.append(entry(target.left_out))
            return
        if not self.asked[target.part]:
            self.report.left_alone.append(entry(NOT_ASKED))
            return
        note = target.runs if _RECORD in reported.__dict__ else None
        if note is None and target.already is not None:
            note = target.already(site)
        if note is not None:
            self.report.already_swapped.append(entry(note))
            return
        problem = target.problem(site)
        if problem is not None:
            self.report.left_alone.append(entry(problem))
            return
        for owner, values in target.patch(site).items():
            if _RECORD not in owner.__dict__:  # else patched a moment ago, for an earlier layer
                _patch(owner, self.token, values)
            record = owner.__dict__[_RECORD]
            if values.keys() == {ATTN_IMPLEMENTATION}:
                # A model-wide switch, shared by its layers: undo names each layer it covered.
                owner_path = self.paths[id(owner)]
                record.covers.append(path.removeprefix(f"{owner_path}.") if owner_path else path)
        self.report.replaced.append(entry(target.runs))

    def report_unknown_attention(self) -> None:
        """Attention-like modules no target matched, outside and around those it did."""
        for path, module in self.model.named_modules():
            name = type(module).__name__
            if path == "" or id(module) in self.claimed or not any(word in name for word in _ATTENTION_WORDS):
                continue
            if any(path == seen or path.startswith(f"{seen}.") or seen.startswith(f"{path}.") for seen in self.seen):
                continue
            library = type(module).__module__.split(".")[0]
            self.report.left_alone.append(SwapEntry(path, f"{library} {name}", UNKNOWN))


def register_transformers_attention() -> str:
    """Register "vitriton" with transformers (attention and mask interfaces); returns the name.

    After this, ``ViTForImageClassification.from_pretrained(..., attn_implementation="vitriton")``
    or ``ViTConfig(attn_implementation="vitriton")`` build models that run on our kernels.
    Masks are built as for "sdpa" (bool, True = may attend). ``swap`` calls it for you, first
    thing, whatever the model, once transformers is imported.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(HF_ATTENTION_NAME, fw.transformers_attention)
    AttentionMaskInterface.register(HF_ATTENTION_NAME, sdpa_mask)
    return HF_ATTENTION_NAME


def swap(model: nn.Module, attention: bool = True, patch_embed: bool = True) -> SwapReport:
    """Put vitriton's kernels into ``model`` in place; returns a report (print it) with ``undo()``.

    ``attention`` and ``patch_embed`` choose what to replace. Parameters are not copied or moved:
    ``state_dict()`` is unchanged. Swapping a swapped model changes nothing and says so. A model
    with no attention or patch-embedding module at all is a ValueError.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap: expected a torch.nn.Module, got {type(model).__name__}")
    if "transformers" in sys.modules:
        register_transformers_attention()
    walk = _Walk(model, attention, patch_embed)
    for path, module in model.named_modules():
        walk.visit(path, module)
    walk.report_unknown_attention()
    report = walk.report
    if not (report.replaced or report.already_swapped or report.left_alone):
        known = ", ".join(dict.fromkeys(f"{t.library} {t.class_name}" for t in TARGETS))
        raise ValueError(
            f"swap: found no attention or patch-embedding module it knows in {type(model).__name__}; it knows {known}"
        )
    return report


# ``kernels.swap`` is the function above (kernels/__init__.py binds the name over this module's), so
# the module's public names hang on it too, and the README's ``kernels.swap.TARGETS`` and
# ``kernels.swap.swap_table()`` work as written. ``from kernels.swap import ...`` reads the module.
swap.TARGETS = TARGETS
swap.SwapTarget = SwapTarget
swap.SwapReport = SwapReport
swap.SwapEntry = SwapEntry
swap.swap_table = swap_table
swap.register_transformers_attention = register_transformers_attention
swap.unswap = unswap
