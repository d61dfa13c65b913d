"""A model summary: each layer, the shape it outputs and its parameter count, from one forward."""

from __future__ import annotations

import torch
from torch import nn


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summary(model: nn.Module, images: torch.Tensor, depth: int = 2) -> str:
    """Run ``model(images)`` once and tabulate the modules down to ``depth`` levels of nesting."""
    rows: list[tuple[str, str, str, int]] = []
    hooks = []
    for name, module in model.named_modules():
        level = name.count(".") + 1 if name else 0
        if 0 < level <= depth:
            def record(module, inputs, output, name=name):
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else "-"
                own = sum(p.numel() for p in module.parameters())
                rows.append((name, type(module).__name__, str(shape), own))

            hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    width = max(len(name) for name, *_ in rows) if rows else 10
    lines = [f"{'layer':<{width}}  {'type':<20} {'output shape':<22} {'params':>12}"]
    lines += [f"{name:<{width}}  {kind:<20} {shape:<22} {params:>12,}" for name, kind, shape, params in rows]
    total = count_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines.append(f"total parameters: {total:,} (trainable {trainable:,})")
    return "\n".join(lines)
