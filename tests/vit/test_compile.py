"""torch.compile(fullgraph=True) traces the ViT with the flag on: no graph break, forward and backward.

The Triton kernels are custom ops (``torch.library.triton_op``). Under Triton's interpreter
``wrap_triton`` hands back the raw kernel, which cannot run on fake tensors, so the CPU check runs
in a subprocess with the interpreter off, on "meta" tensors: Dynamo and AOTAutograd trace the
whole model through the ops' shape functions, forward and backward, and nothing is launched. On
a GPU the kernel tests also compile and run the ops for real (tests/attention/test_triton.py,
tests/patch_embed/test_triton.py).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kernels
from vit.model import ViT

SMALL = {"image_size": 32, "patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10}
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.subprocess
def test_fused_vit_traces_fullgraph_through_the_custom_ops():
    script = textwrap.dedent(
        f"""
        import torch
        import kernels
        from vit.model import ViT

        graphs = []

        def count_ops(gm, example_inputs):  # a Dynamo backend that records the graph, then runs it
            graphs.append([str(node.target) for node in gm.graph.nodes if node.op == "call_function"])
            return gm

        model = ViT(fused=True, **{SMALL!r}).to("meta")
        images = torch.empty(2, 3, 32, 32, device="meta", requires_grad=True)
        with kernels.use_backend("triton"):
            logits = torch.compile(model, backend=count_ops, fullgraph=True)(images)
            torch.compile(model, backend="aot_eager", fullgraph=True)(images).sum().backward()
        assert logits.shape == (2, 10), logits.shape
        assert len(graphs) == 1, len(graphs)
        ops = graphs[0]
        assert sum("vitriton.attention_forward" in op for op in ops) == 2, ops
        assert sum("vitriton.patch_embed_forward" in op for op in ops) == 1, ops
        assert images.grad.shape == images.shape
        assert all(p.grad is not None for p in model.parameters())
        print("traced")
        """
    )
    environment = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=environment, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0 and "traced" in result.stdout, result.stderr[-3000:]
    # No GPU driver here is expected while tracing on meta tensors: no log lines, no tracebacks.
    assert "Traceback" not in result.stderr and "active drivers" not in result.stderr, result.stderr[-3000:]


def test_reference_path_compiles_fullgraph():
    torch.manual_seed(0)
    model = ViT(fused=False, **SMALL).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        actual = torch.compile(model, backend="aot_eager", fullgraph=True)(images)
    torch.testing.assert_close(actual, expected)


def test_dispatch_compiles_fullgraph():
    q, k, v = (torch.randn(1, 2, 7, 16) for _ in range(3))

    def attend(q, k, v):
        return kernels.attention(q, k, v, backend="einsum")

    torch.testing.assert_close(torch.compile(attend, fullgraph=True, backend="eager")(q, k, v), attend(q, k, v))
