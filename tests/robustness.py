"""What the robustness tests of every subsystem share (tests/*/test_robustness.py).

``one_line_error`` checks the error contract at the public boundary: the expected type, a message
that matches, one line. ``randn`` and ``qkv`` make seeded inputs on the tests' device, and
``examples`` is the property tests' budget: many examples on a GPU, a handful in the interpreter
(each costs seconds there). The fixtures they use, ``no_launches`` and ``fresh_warnings``, are in
tests/conftest.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

from tests.equivalence import DEVICE, ON_GPU

FEW, MANY = 12, 200


def examples(n_interpreted: int = FEW) -> settings:
    return settings(
        max_examples=MANY if ON_GPU else n_interpreted, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )


def one_line_error(error_type, match: str, function, *args, **kwargs) -> str:
    """Run ``function``, expect ``error_type`` whose message matches and is a single line."""
    with pytest.raises(error_type, match=match) as caught:
        function(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def randn(*shape, dtype=torch.float32, device=DEVICE, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(device, dtype)


def qkv(batch=1, heads=2, n_queries=5, n_keys=5, dim=16, dim_v=None, dtype=torch.float32, device=DEVICE, seed=0):
    dim_v = dim if dim_v is None else dim_v
    return (
        randn(batch, heads, n_queries, dim, dtype=dtype, device=device, seed=seed),
        randn(batch, heads, n_keys, dim, dtype=dtype, device=device, seed=seed + 1),
        randn(batch, heads, n_keys, dim_v, dtype=dtype, device=device, seed=seed + 2),
    )
