"""What a swap did, and how it is undone.

``swap`` fills a ``SwapReport``: ``replaced``, ``already_swapped`` and ``left_alone``, lists of
``SwapEntry`` (path, kind, note; a replaced entry also lists the paths it ``patched``). Printed,
consecutive numbered paths with the same note are one line (``blocks.0-11.attn (12)``), and the
head line counts what ``undo()`` restores when that differs from the modules replaced (a timm
ViT's patch embedding also patches the model's own ``_pos_embed``).

Each patched module keeps an undo record in its ``__dict__``: the previous value of every instance
attribute the patch set (``_Absent``: there was none, the class's applies). ``report.undo()``
restores the records of that one swap, ``unswap(model)`` every record in the model.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

from torch import nn

RECORD = "_vitriton_swap"  # the attribute that holds a swapped module's undo record
ATTN_IMPLEMENTATION = "attn_implementation"  # a "patch" that is a call to set_attn_implementation
SCRIPT_HOOK = "__prepare_scriptable__"  # torch.jit.script calls it on each module first: see _RefuseScript


@dataclasses.dataclass(frozen=True)
class SwapEntry:
    """One module: where it is (``path`` from the model, "" for the model itself), what it is,
    and a note: how it now runs, or why it was left alone. ``patched``: for a replaced module,
    the paths this swap patched for it, which ``undo()`` restores (its own, and any other its
    patch reaches, such as the model whose ``_pos_embed`` a timm patch embedding takes over)."""

    path: str
    kind: str
    note: str
    patched: tuple[str, ...] = ()


class SwapReport:
    """What ``swap`` did: ``replaced``, ``already_swapped`` and ``left_alone``, lists of SwapEntry."""

    def __init__(self, model: nn.Module, token: object):
        self.model_name = type(model).__name__
        self.replaced: list[SwapEntry] = []
        self.already_swapped: list[SwapEntry] = []
        self.left_alone: list[SwapEntry] = []
        self._model = model
        self._token = token
        self.fp8 = False  # swap(fp8=True): the swapped attention runs in FP8

    def undo(self) -> list[str]:
        """Restore the modules this swap patched; returns their paths."""
        return _restore(self._model, self._token)

    def __str__(self) -> str:
        patched = sum(len(e.patched) for e in self.replaced)
        replaced = f"{len(self.replaced)} replaced"
        if patched != len(self.replaced):
            replaced += f" ({patched} modules patched)"
        head = (
            f"swap({self.model_name}): {replaced}, "
            f"{len(self.already_swapped)} already swapped, {len(self.left_alone)} left alone"
            + (", attention in FP8 (e4m3, inference only)" if self.fp8 else "")
        )
        rows = []  # (status, paths, kind, note)
        for status, entries in (("replaced", self.replaced), ("already swapped", self.already_swapped),
                                ("left alone", self.left_alone)):
            for _, same in itertools.groupby(entries, key=lambda e: (e.kind, e.note)):
                for run in _runs(list(same), path=lambda e: e.path):
                    note = run[0].note
                    others = [p for e in run for p in e.patched if p != e.path]
                    if others:
                        note += "; also patched: " + ", ".join(_span(paths) for paths in _runs(others))
                    rows.append((status, _span([e.path for e in run]), run[0].kind, note))
        status_width = max((len(status) for status, *_ in rows), default=0)
        path_width = max((len(paths) for _, paths, *_ in rows), default=0)
        lines = [head]
        for status, paths, kind, note in rows:
            separator = ": " if status == "left alone" else " "
            lines.append(f"  {status:<{status_width}}  {paths:<{path_width}}  {kind}{separator}{note}")
        return "\n".join(lines)

    __repr__ = __str__


def _counts_up(before: str, after: str) -> int | None:
    """The place (index of a dotted part) where ``after`` is ``before`` with one number one higher
    (``blocks.0`` then ``blocks.1``, ``encoder_layer_0`` then ``encoder_layer_1``), else None."""
    a, b = before.split("."), after.split(".")
    differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if len(a) != len(b) or len(differ) != 1:
        return None
    x, y = (re.fullmatch(r"(.*?)(\d+)", part) for part in (a[differ[0]], b[differ[0]]))
    if x and y and x[1] == y[1] and int(y[2]) == int(x[2]) + 1:
        return differ[0]
    return None


def _runs(items: list, path=lambda item: item) -> list[list]:
    """``items`` in order, cut into runs whose paths count up one number in one place
    (blocks.0.attn, blocks.1.attn, ...); an item that continues no run starts its own."""
    runs: list[list] = []
    for item in items:
        run = runs[-1] if runs else None
        place = _counts_up(path(run[-1]), path(item)) if run else None
        if place is not None and (len(run) == 1 or place == _counts_up(path(run[0]), path(run[1]))):
            run.append(item)
        else:
            runs.append([item])
    return runs


def _span(paths: list[str]) -> str:
    """A run of paths as one: ``blocks.0-11.attn (12)``; one path as itself, the model as ``(model)``."""
    if len(paths) == 1:
        return paths[0] or "(model)"
    place = _counts_up(paths[0], paths[1])
    first, last = paths[0].split("."), paths[-1].split(".")
    last_number = re.fullmatch(r".*?(\d+)", last[place])[1]
    return ".".join([*first[:place], f"{first[place]}-{last_number}", *first[place + 1:]]) + f" ({len(paths)})"


# ---------------------------------------------------------------------------------------------
# Patching and undoing.


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


def patch_instance(module: nn.Module, token: object, values: dict) -> None:
    """Set ``values`` ({name: value}) on the instance ``module``, keeping what undo needs."""
    values = {**values, SCRIPT_HOOK: _RefuseScript(type(module).__name__)}
    previous = {name: module.__dict__.get(name, _Absent) for name in values if name != ATTN_IMPLEMENTATION}
    record = _UndoRecord(token, previous)
    for name, value in values.items():
        if name == ATTN_IMPLEMENTATION:  # a transformers model: its attention implementation, switched
            record.attn_implementation = module.config._attn_implementation
            module.set_attn_implementation(value)
        else:
            setattr(module, name, value)
    setattr(module, RECORD, record)


FP8_HOOKS = "_vitriton_fp8"  # the root module's (token, pre-hook handle, hook handle) of swap(fp8=True)


def run_in_fp8_mode(model: nn.Module, token: object) -> None:
    """Make each call of ``model`` run inside ``kernels.fp8_mode()`` (forward hooks on the root; the
    closing one runs even when the forward raises), until undone."""
    import torch

    from kernels import fp8

    if FP8_HOOKS in model.__dict__:
        return
    entered = []  # the mode's reset tokens, one per call in progress (a model may call itself)

    def enter(module, args):
        if torch.compiler.is_compiling():  # a ContextVar cannot be set in a traced graph: see fp8.compiled_fp8_depth
            fp8.compiled_fp8_depth += 1
        else:
            entered.append(fp8._fp8_mode.set(True))

    def leave(module, args, output):
        if torch.compiler.is_compiling():
            fp8.compiled_fp8_depth -= 1
        else:
            fp8._fp8_mode.reset(entered.pop())

    pre = model.register_forward_pre_hook(enter)
    post = model.register_forward_hook(leave, always_call=True)
    model.__dict__[FP8_HOOKS] = (token, pre, post)


def _restore(model: nn.Module, token: object | None) -> list[str]:
    restored = []
    hooks = model.__dict__.get(FP8_HOOKS)
    if hooks is not None and (token is None or hooks[0] is token):
        hooks[1].remove()
        hooks[2].remove()
        del model.__dict__[FP8_HOOKS]
    for path, module in model.named_modules():
        record = module.__dict__.get(RECORD)
        if record is None or (token is not None and record.token is not token):
            continue
        for name, value in record.previous.items():
            if value is _Absent:
                module.__dict__.pop(name, None)
            else:
                setattr(module, name, value)
        if record.attn_implementation is not None:
            module.set_attn_implementation(record.attn_implementation)
        del module.__dict__[RECORD]
        restored.append(path)
        restored.extend(f"{path}.{below}" if path else below for below in record.covers)
    return restored


def unswap(model: nn.Module) -> list[str]:
    """Undo every swap done on ``model`` (or on its parts); returns the paths restored."""
    return _restore(model, None)
