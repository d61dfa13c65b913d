"""The walk: ``swap(model)`` visits every module once and reports each one a row knows.

For each module (outermost first) it takes the first active row that matches (a row is active once
its library's module is imported: swapping never imports timm, torchvision or transformers for
you), then: a row that is never swapped, or a part not asked for, is left alone; a module that
already runs on our kernels is already swapped; a ``why_left_alone`` reason leaves it alone;
otherwise its ``instance_patches`` are set (report.py keeps what undo needs). Submodules a row
``also_swaps`` are not visited again. Attention-like modules no row knows are listed as left
alone, so the report is complete. transformers models are switched whole: one layer the kernels
cannot take leaves the model as it is.
"""

from __future__ import annotations

import functools
import sys

from torch import nn

from kernels.swap.report import (
    ATTN_IMPLEMENTATION,
    RECORD,
    SwapEntry,
    SwapReport,
    patch_instance,
    run_in_fp8_mode,
)
from kernels.swap.rows import Site
from kernels.swap.targets import TARGETS
from kernels.swap.transformers import (
    interface_layer_problem,
    reads_attention_interface,
    register_transformers_attention,
)

NOT_ASKED = "not asked (attention=False or patch_embed=False)"

# Attention-like modules no target knows: listed as left alone, so the report is complete.
_ATTENTION_WORDS = ("Attention", "Attn", "MHSA", "MHA")
UNKNOWN = "no swap target knows this class: it keeps its own attention"


def _loaded_class(module_name: str, class_name: str):
    """A class from a library the user has already imported, else None: swap imports nothing."""
    return getattr(sys.modules.get(module_name), class_name, None)


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
            cls = _loaded_class(target.module_name, target.class_name) if target.matches_module is None else None
            if cls is not None or (target.matches_module is not None and target.module_name in sys.modules):
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
            problems = (interface_layer_problem(layer) for layer in top.modules() if reads_attention_interface(layer))
            self._model_problems[top_path] = next((p for p in problems if p), None)
        return self._model_problems[top_path]

    def _match(self, module: nn.Module):
        for target, cls in self.targets:
            if target.matches_module is not None:
                if target.matches_module(module):
                    return target, type(module)
            elif isinstance(module, cls):  # subclasses too: each why_left_alone() checks what they override
                return target, cls
        return None, None

    def visit(self, path: str, module: nn.Module) -> None:
        if id(module) in self.claimed:
            return
        target, cls = self._match(module)
        if target is None:
            return
        for below in target.also_swaps:
            self.claimed.add(id(module.get_submodule(below)))
        site = Site(path, module, cls, self)
        below = target.reported_submodule
        where = f"{path}.{below}" if path and below else (below or path)
        self.seen.append(where)
        reported = module.get_submodule(below) if below else module
        kind = f"{target.library} {type(module).__name__}" if target.matches_module else target.kind
        entry = functools.partial(SwapEntry, where, kind)
        if target.never_swapped_because:
            self.report.left_alone.append(entry(target.never_swapped_because))
            return
        if not self.asked[target.swap_argument]:
            self.report.left_alone.append(entry(NOT_ASKED))
            return
        note = target.becomes if RECORD in reported.__dict__ else None
        if note is None and target.already_on_kernels is not None:
            note = target.already_on_kernels(site)
        if note is not None:
            self.report.already_swapped.append(entry(note))
            return
        problem = target.why_left_alone(site)
        if problem is not None:
            self.report.left_alone.append(entry(problem))
            return
        patched = []  # the paths undo() will restore for this entry
        for owner, values in target.instance_patches(site).items():
            if RECORD not in owner.__dict__:  # else patched a moment ago, for an earlier layer
                patch_instance(owner, self.token, values)
                if id(owner) in self.paths:  # undo restores the model's own modules
                    patched.append(self.paths[id(owner)])
            record = owner.__dict__[RECORD]
            if values.keys() == {ATTN_IMPLEMENTATION}:
                # A model-wide switch, shared by its layers: undo names each layer it covered.
                owner_path = self.paths[id(owner)]
                record.covers.append(path.removeprefix(f"{owner_path}.") if owner_path else path)
                if record.token is self.token:
                    patched.append(path)
        self.report.replaced.append(entry(target.becomes, tuple(patched)))

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


def swap(model: nn.Module, attention: bool = True, patch_embed: bool = True, *, fp8: bool = False) -> SwapReport:
    """Put vitriton's kernels into ``model`` in place; returns a report (print it) with ``undo()``.

    ``attention`` and ``patch_embed`` choose what to replace. Parameters are not copied or moved:
    ``state_dict()`` is unchanged. Swapping a swapped model changes nothing and says so. A model
    with no attention or patch-embedding module at all is a ValueError.

    ``fp8=True``, for an eval-mode model run without gradients: each call of the model runs in
    ``kernels.fp8_mode()``, so every swapped attention layer quantises its q, k, v to e4m3
    (``kernels.quantize_fp8``, per batch and head) and runs the FP8 forward, its output in the
    layer's dtype; packed-sequence layers (``attention_varlen``: the VLM towers) too, with one scale
    per head. A backward through it is a one-line error. ``undo()`` removes it with the rest.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap: expected a torch.nn.Module, got {type(model).__name__}")
    if fp8 and not attention:
        raise ValueError("swap: fp8=True runs the swapped attention in FP8; it needs attention=True")
    if "transformers" in sys.modules:
        register_transformers_attention()
    walk = _Walk(model, attention, patch_embed)
    for path, module in model.named_modules():
        walk.visit(path, module)
    walk.report_unknown_attention()
    report = walk.report
    if fp8:
        run_in_fp8_mode(model, walk.token)
        report.fp8 = True
    if not (report.replaced or report.already_swapped or report.left_alone):
        known = ", ".join(dict.fromkeys(f"{t.library} {t.class_name}" for t in TARGETS))
        raise ValueError(
            f"swap: found no attention or patch-embedding module it knows in {type(model).__name__}; it knows {known}"
        )
    return report
