"""The narrow last block: a last, partial block of at most 16 keys (forward, dQ) or query rows (dK/dV)
runs as a 16-wide copy of the masked body, a longer one as a whole block (``_forward_tail``).

In the interpreter, with blocks of 64 along the narrowed dimension (forward 64x64, dK/dV 64 rows,
dQ 64 keys): which width each block ran (the block helpers spied on), and the output and every
gradient against the float64 reference, dense and packed, lean and masked, where the last block
is narrow (tails of 1, 5, 16), whole (17, 26, 36) and absent. The machine code (the narrow copy
outside the main loop, the main loop unchanged) is held by tests/machine/test_sass.py.
"""

import pytest
import torch
import triton

from kernels.triton import attention_bwd, attention_bwd_dq, attention_fwd
from kernels.triton.attention_bwd import _attention_backward_kv_kernel
from kernels.triton.attention_bwd_dq import _attention_backward_q_kernel
from kernels.triton.attention_fwd import _attention_forward_kernel
from kernels.triton.attention_ops import attention_triton
from tests.attention.test_triton import (
    check_against_reference,
    check_dropout,
    make_inputs,
)
from tests.attention.test_varlen_triton import check_varlen, packed_inputs
from tests.equivalence import ON_GPU

f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
pytestmark = pytest.mark.interpreter
WIDE = 64  # the narrowed dimension's block in these tests
# The block widths are counted by spying on the block helpers, which only Triton's interpreter calls as
# Python functions (compiled, a jit function cannot call a Python global); on a GPU the equivalence
# checks run and tests/machine/test_sass.py holds the narrow block's machine code.
counts_calls = pytest.mark.skipif(ON_GPU, reason="counts the interpreter's calls of the block helpers")


def wide_configs(monkeypatch, narrow_dq=True):
    """One config per kernel, with blocks of WIDE along the dimension each narrows."""
    configs = {
        _attention_forward_kernel: {"BLOCK_M": 64, "BLOCK_N": WIDE},
        _attention_backward_kv_kernel: {"BLOCK_M": WIDE, "BLOCK_N": 32},
        _attention_backward_q_kernel: {"BLOCK_M": 32, "BLOCK_N": WIDE, "NARROW_TAIL": narrow_dq},
    }
    for kernel, sizes in configs.items():
        monkeypatch.setattr(kernel, "configs", [triton.Config(sizes, num_warps=4, num_stages=1)])


def spy_on_blocks(monkeypatch) -> dict:
    """{pass: [(width, masked) of each block helper call]}: the forward's and dQ's BLOCK_N, dK/dV's BLOCK_M.
    The interpreter runs the kernels as Python, so the helpers are looked up as module globals."""
    calls = {"forward": [], "dkdv": [], "dq": []}
    for module, name, key, width in (
        (attention_fwd, "_forward_block", "forward", "BLOCK_N"),
        (attention_bwd, "_backward_kv_block", "dkdv", "BLOCK_M"),
        (attention_bwd_dq, "_backward_q_block", "dq", "BLOCK_N"),
    ):
        helper = getattr(module, name)

        def spy(*args, _helper=helper, _key=key, _width=width, **kwargs):
            calls[_key].append((int(kwargs[_width]), bool(kwargs["MASKED"])))
            return _helper(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


def expected_blocks(length: int, masked: bool) -> list[tuple[int, bool]]:
    """The blocks one program walks over ``length`` keys (or rows) without causal skipping."""
    whole, tail = divmod(length, WIDE)
    last = [] if tail == 0 else [(16 if tail <= 16 else WIDE, True)]
    return [(WIDE, masked)] * whole + last


@counts_calls
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(69, 133), (80, 76), (100, 90), (17, 81), (64, 128)])
def test_last_block_width(seqlen_q, seqlen_k, monkeypatch):
    """Each pass runs its whole blocks at 64 and its last one 16 wide when it holds at most 16 (one
    program per pass here: q and k fit one block of the other dimension)."""
    wide_configs(monkeypatch)
    calls = spy_on_blocks(monkeypatch)
    inputs = make_inputs(1, 1, seqlen_q, seqlen_k, 32, f16)
    q, k, v = (inputs[name].clone().requires_grad_() for name in "qkv")
    out = attention_triton(q, k, v)
    out.backward(torch.ones_like(out))
    programs_q = triton.cdiv(seqlen_q, 64)  # the forward's BLOCK_M
    assert calls["forward"] == expected_blocks(seqlen_k, masked=False) * programs_q
    assert calls["dkdv"] == expected_blocks(seqlen_q, masked=False) * triton.cdiv(seqlen_k, 32)
    assert calls["dq"] == expected_blocks(seqlen_k, masked=False) * triton.cdiv(seqlen_q, 32)


@counts_calls
def test_whole_last_block_where_the_config_says(monkeypatch):
    """A dQ config with NARROW_TAIL off runs its last block whole (the tiles whose narrow copy costs
    a block per SM on sm_90: configs._BACKWARD_Q_WHOLE_TAIL)."""
    wide_configs(monkeypatch, narrow_dq=False)
    calls = spy_on_blocks(monkeypatch)
    inputs = make_inputs(1, 1, 20, 69, 32, f16)
    q, k, v = (inputs[name].clone().requires_grad_() for name in "qkv")
    attention_triton(q, k, v).sum().backward()
    assert calls["dq"] == [(WIDE, False), (WIDE, True)]
    assert calls["forward"][-1] == (16, True)


@pytest.mark.parametrize("dtype", [f16, bf16, f32])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(69, 133), (80, 76), (100, 90), (17, 81)])
def test_lean_path_against_reference(seqlen_q, seqlen_k, dtype, monkeypatch):
    """No mask: whole blocks lean, the last one narrow or whole; the output and dq, dk, dv."""
    wide_configs(monkeypatch)
    check_against_reference(make_inputs(1, 2, seqlen_q, seqlen_k, 32, dtype), scale=0.3)


@pytest.mark.parametrize(
    "seqlen_q, seqlen_k, dtype",
    [(69, 133, f16), (133, 69, bf16), (80, 76, f16), (100, 90, bf16)],
)
def test_masked_path_against_reference(seqlen_q, seqlen_k, dtype, monkeypatch):
    """A float bias with its gradient and a causal mask (every block masked, the last narrowed, the
    causal end inside a block), then dropout: the same keep mask in the narrow block as in the reference."""
    wide_configs(monkeypatch)
    inputs = make_inputs(1, 2, seqlen_q, seqlen_k, 32, dtype, mask=("float", (1, 2, seqlen_q, seqlen_k), f32))
    check_against_reference(inputs, is_causal=True)
    check_dropout(make_inputs(1, 2, seqlen_q, seqlen_k, 32, dtype, seed=3), 0.25)


def test_split_head_dim_with_narrow_block(monkeypatch):
    """D = 80, split 64 + 16: both pieces of the narrow block's dots."""
    wide_configs(monkeypatch)
    check_against_reference(make_inputs(1, 2, 69, 133, 80, f16), scale=0.2)


@pytest.mark.parametrize("is_causal", [False, True])
def test_packed_sequences_end_anywhere(is_causal, monkeypatch):
    """One launch, sequences whose last blocks are narrow, whole, absent or empty: the width is
    picked per sequence at run time."""
    wide_configs(monkeypatch)
    lengths_q, lengths_k = [69, 80, 100, 17, 64, 0], [133, 76, 90, 81, 128, 5]
    if is_causal:
        lengths_k = lengths_q
    check_varlen(lengths_q, lengths_k, packed_inputs(lengths_q, lengths_k, 2, 32, f16), is_causal=is_causal)


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(69, 133), (80, 76), (100, 90)])
def test_fused_backward_narrows_its_last_row_block(seqlen_q, seqlen_k, monkeypatch):
    """The fused backward (forced; its 64-row blocks are the interpreter's): the last row block of at
    most 16 rows runs 16 wide, its dQ as k^T dS; the output and every gradient against the reference."""
    from kernels.triton import attention_bwd_fused, launch

    monkeypatch.setattr(launch, "FUSED_BACKWARD_MIN_KEYS", 0)
    helper, widths = attention_bwd._backward_kv_block, []

    def spy(*args, **kwargs):
        if kwargs.get("ADD_GRAD_Q"):  # the fused kernel's calls (the pair's dK/dV kernel shares the helper)
            widths.append((int(kwargs["BLOCK_M"]), bool(kwargs["MASKED"])))
        return helper(*args, **kwargs)

    # The fused kernel calls the block helper directly and through _backward_kv_tail (attention_bwd's
    # globals). Spied on in the interpreter only (see counts_calls); on a GPU the check alone runs.
    if not ON_GPU:
        monkeypatch.setattr(attention_bwd_fused, "_backward_kv_block", spy)
        monkeypatch.setattr(attention_bwd, "_backward_kv_block", spy)
    check_against_reference(make_inputs(1, 2, seqlen_q, seqlen_k, 32, f16), scale=0.3)
    programs = 2 * triton.cdiv(seqlen_k, 32)  # heads x key blocks of the interpreter's config
    assert ON_GPU or widths == expected_blocks(seqlen_q, masked=False) * programs
