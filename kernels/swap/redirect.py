"""The SDPA redirect: a library's own forward, run with its SDPA call on our kernels.

Many attention modules (most of timm's, BEiT's, Swin's, Data2VecVision's SDPA class) do their own
preprocessing (RoPE, q/k norms, relative-position biases, windows) and then make one call to
``F.scaled_dot_product_attention``. ``redirected(forward)`` is a copy of that forward function (the
same code, defaults and closure) whose globals are the library module's, except that ``F`` (or
``torch``, when it is called as ``torch.nn.functional.scaled_dot_product_attention``) is a copy in
which that one function is ``kernels.scaled_dot_product_attention``. So the swapped module computes
exactly its library's forward, with no code of ours to keep in step with the library.

Its limits. Only calls written in the forward itself are redirected: a helper it calls keeps the
real SDPA unless its name is passed in ``extra`` with a replacement (torchvision's
``shifted_window_attention``); SDPA imported as a bare name, or a forward wrapped by a decorator,
cannot be redirected (``why_not_redirectable`` says so, and the module is left alone). The copy's
globals are a snapshot taken when it is made: a helper monkeypatched into the library's module
later is not seen by swapped modules (unswap and swap again). Our SDPA's own limits apply
(head dims, checked at swap time where the module names its head dim).
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
import torch.nn.functional as F

from kernels import dispatch


def _sdpa_through_kernels(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` as the redirected forwards see it (looked up per call,
    so ``kernels.use_backend`` and test spies on ``dispatch`` apply)."""
    return dispatch.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _copy_module(module: types.ModuleType, **replaced) -> types.ModuleType:
    copy = types.ModuleType(module.__name__, module.__doc__)
    copy.__dict__.update(vars(module))
    copy.__dict__.update(replaced)
    return copy


@functools.cache
def _namespaces() -> tuple[types.ModuleType, types.ModuleType]:
    """(torch.nn.functional, torch) as seen by a redirected forward: theirs, but for SDPA."""
    functional = _copy_module(F, scaled_dot_product_attention=_sdpa_through_kernels)
    torch_copy = _copy_module(torch, nn=_copy_module(torch.nn, functional=functional))
    return functional, torch_copy


def sdpa_aliases(function) -> dict[str, types.ModuleType] | None:
    """The global names through which ``function`` reaches SDPA, each with its replacement, or None."""
    code = getattr(function, "__code__", None)
    if code is None or "scaled_dot_product_attention" not in code.co_names:
        return None
    functional, torch_copy = _namespaces()
    aliases = {}
    for name in code.co_names:
        value = function.__globals__.get(name)
        if value is F:
            aliases[name] = functional
        elif value is torch and "nn" in code.co_names and "functional" in code.co_names:
            aliases[name] = torch_copy
    return aliases or None


@functools.cache
def redirected(function, extra: tuple = ()):
    """A copy of ``function`` whose ``F.scaled_dot_product_attention`` (or
    ``torch.nn.functional.scaled_dot_product_attention``) calls ``kernels`` instead; ``extra``:
    more (global name, replacement) pairs, for a library helper written out in our files."""
    namespace = {**function.__globals__, **(sdpa_aliases(function) or {}), **dict(extra)}
    copy = types.FunctionType(function.__code__, namespace, function.__name__, function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__, copy.__doc__ = function.__qualname__, function.__doc__
    copy.__vitriton_redirects__ = (function, extra)  # made at run time: pickled as (function, extra), see rows.bound
    return copy


def why_not_redirectable(cls: type) -> str | None:
    """Why ``cls.forward`` cannot be redirected (None: it can)."""
    function = inspect.unwrap(cls.forward)
    if function is not cls.forward:
        return f"{cls.__name__}.forward is wrapped by a decorator, so its SDPA call cannot be redirected"
    if sdpa_aliases(function) is None:
        return f"{cls.__name__}.forward makes no F.scaled_dot_product_attention call of its own"
    return None
