"""One row of the swap table (``SwapTarget``), and what the rows of every library share.

A row names a class, the ``swap`` argument that asks for it, what it becomes, and two functions
of a ``Site`` (the module the walk found): ``why_left_alone(site)``, why the kernels cannot compute
this instance exactly (None: they can), and ``instance_patches(site)``, the instance attributes to
set, ``{module: {name: value}}``, usually one ``forward`` made by ``bound``. Each library file
(timm.py, torch_nn.py, transformers.py) declares its ``ROWS`` with ``SwapTarget`` or the short
forms here: ``redirected_row`` (the library's own forward, its SDPA call on our kernels: see
redirect.py), ``written_row`` (a forward written out in that file, the library's attention on our
kernel) and ``left_out_row`` (never swapped, and why). The checks every row uses are here too.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable

import torch
from torch import nn

from kernels.checks import MAX_HEAD_DIM, MIN_HEAD_DIM
from kernels.swap.redirect import redirected, why_not_redirectable

ATTENTION_DONE = "-> kernels.attention"
PATCH_EMBED_DONE = "-> kernels.patch_embed"


@dataclasses.dataclass
class Site:
    """A module found by the walk: where it is, what it is, the class it matched, the walk."""

    path: str
    module: nn.Module
    cls: type
    walk: object


@dataclasses.dataclass(frozen=True, kw_only=True)
class SwapTarget:
    """One class swap knows: where it lives, which ``swap`` argument asks for it, and how.

    A row with ``never_swapped_because`` is never patched: the reason is what the kernels cannot
    compute. The README's swap table is one line per row (``swap_table()``).
    """

    library: str  # timm, torch, torchvision, transformers, vit: the report's and README's first word
    module_name: str  # where the class lives; the row is active once that module is imported
    class_name: str
    swap_argument: str  # the swap() argument that asks for it: "attention" or "patch_embed"
    becomes: str  # how it runs once swapped: the report's note and the README's "becomes"
    why_left_alone: Callable[[Site], str | None] | None = None  # why not this instance (None: swap it)
    instance_patches: Callable[[Site], dict] | None = None  # {module: {name: value}} to set
    never_swapped_because: str = ""  # never swapped, and why
    reported_submodule: str = ""  # the submodule the report names (a timm VisionTransformer: its patch_embed)
    also_swaps: tuple[str, ...] = ()  # submodules swapped as part of this one, not visited again
    matches_module: Callable[[nn.Module], bool] | None = None  # instead of a class: a test of the module
    already_on_kernels: Callable[[Site], str | None] | None = None  # a note when it already runs on our kernels
    report_kind: str = ""  # the report's kind, when not "library class"

    @property
    def kind(self) -> str:
        return self.report_kind or f"{self.library} {self.class_name}"


# ---------------------------------------------------------------------------------------------
# Binding a forward to its module.


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


# ---------------------------------------------------------------------------------------------
# The checks every row uses.


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


def module_head_dim(module: nn.Module) -> int | None:
    for name in ("head_dim", "attention_head_size", "dim_head", "key_dim"):
        value = getattr(module, name, None)
        if isinstance(value, int):
            return value
    return None


def as_batch_bias(bias: torch.Tensor, batch: int) -> torch.Tensor:
    """A per-window bias (W, H, N, N) for a batch of B * W windows, windows fastest, as (B * W, H, N, N)."""
    windows = bias.shape[0]
    return bias.unsqueeze(0).expand(batch // windows, *bias.shape).reshape(batch, *bias.shape[1:])


# ---------------------------------------------------------------------------------------------
# The short forms of a row.


def sdpa_redirect_problem(site: Site) -> str | None:
    module, cls = site.module, site.cls
    head_dim = module_head_dim(module)
    return (
        why_not_redirectable(cls)
        or overrides(module, cls)
        or (head_dim_problem(head_dim) if head_dim is not None else None)
        or patched_elsewhere(module)
    )


def sdpa_redirect_patch(site: Site) -> dict:
    values = {"forward": bound(redirected(site.cls.forward), site.module)}
    if hasattr(site.module, "fused_attn"):
        values["fused_attn"] = True  # the branch of the forward that makes the SDPA call
    return {site.module: values}


def redirected_row(*, library: str, module_name: str, class_name: str, becomes: str, **options) -> SwapTarget:
    """A row whose forward is the library's own, with its one SDPA call on our kernels."""
    return SwapTarget(
        library=library, module_name=module_name, class_name=class_name, swap_argument="attention",
        becomes=f"{ATTENTION_DONE}: {becomes}",
        why_left_alone=sdpa_redirect_problem, instance_patches=sdpa_redirect_patch, **options,
    )


def written_out_problem(site: Site) -> str | None:
    module = site.module
    head_dim = module_head_dim(module)
    if head_dim is None and hasattr(module, "num_heads") and hasattr(module, "proj"):
        head_dim = getattr(module.proj, "in_features", 0) // module.num_heads
    return overrides(module, site.cls) or (head_dim_problem(head_dim) if head_dim else None) or patched_elsewhere(module)


def written_out_patch(forward):
    """The patch of a row whose forward is written out in our files."""
    return lambda site: {site.module: {"forward": bound(forward, site.module)}}


def written_row(*, library: str, module_name: str, class_name: str, forward, becomes: str) -> SwapTarget:
    """A row whose library writes its attention out (no SDPA call): ``forward`` is its copy on our kernel."""
    return SwapTarget(
        library=library, module_name=module_name, class_name=class_name, swap_argument="attention",
        becomes=f"{ATTENTION_DONE}: {becomes}",
        why_left_alone=written_out_problem, instance_patches=written_out_patch(forward),
    )


def left_out_row(*, library: str, module_name: str, class_name: str, why: str, swap_argument: str = "attention") -> SwapTarget:
    """A row never swapped: ``why`` is what the kernels cannot compute."""
    return SwapTarget(
        library=library, module_name=module_name, class_name=class_name, swap_argument=swap_argument,
        becomes=f"left alone: {why}", never_swapped_because=why,
    )
