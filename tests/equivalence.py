"""The error rule every kernel test uses, and the device the tests run on.

flash-attn's rule: against a float64 reference, the kernel's max error may be at most
``factor`` times the error of the same computation done by PyTorch in the kernel's dtype, plus
a small absolute slack that scales with the dtype's precision.
"""

from __future__ import annotations

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]

# Absolute slack per dtype: a few units in the last place of an O(1) value.
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5, torch.float64: 1e-10}


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(
    actual: torch.Tensor,
    reference64: torch.Tensor,
    reference_low: torch.Tensor,
    *,
    name: str = "output",
    factor: float = 2.0,
) -> None:
    """max|actual - reference64| <= factor * max|reference_low - reference64| + ATOL[dtype].

    ``reference64`` is the reference computed in float64, ``reference_low`` the same reference
    computed in ``actual``'s dtype. NaN anywhere in ``actual`` where the float64 reference has
    none fails.
    """
    assert actual.shape == reference64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    assert not (actual.isnan() & ~reference64.isnan()).any(), f"{name}: NaN where the reference has none"
    allowed = factor * max_error(reference_low, reference64) + ATOL[actual.dtype]
    error = max_error(actual, reference64)
    assert error <= allowed, f"{name}: max error {error:.3e} > allowed {allowed:.3e} ({actual.dtype})"


def assert_training_step_matches(step, swapped, model64, model, inputs, upstream, backend: str, name: str) -> None:
    """A swapped model's training step against its unswapped original's, by the rule above.

    ``step(model, inputs, upstream)`` returns (output, {parameter name: gradient}); the original
    runs in float64 (``model64``) and in its own dtype (``model``), the swapped one under
    ``kernels.use_backend(backend)``. The output and every gradient are compared; a parameter
    without a gradient must have none on both sides.
    """
    import kernels

    out64, grads64 = step(model64, inputs, upstream)
    out_low, grads_low = step(model, inputs, upstream)
    with kernels.use_backend(backend):
        out, grads = step(swapped, inputs, upstream)
    assert_close_to_reference(out, out64, out_low, name=f"{name} train output")
    assert list(grads) == list(grads64)
    for param, grad in grads.items():
        assert (grad is None) == (grads64[param] is None), param
        if grad is not None:
            assert_close_to_reference(grad, grads64[param], grads_low[param], name=f"{name} grad {param}")
