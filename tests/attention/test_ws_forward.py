"""The warp-specialised forward (``kernels/triton/attention_fwd_ws.py``), which sm_100 runs, here in the
interpreter with the launcher made to pick it whatever the architecture.

Its output and statistics feed the same backward as the other forward's: so the output and every
gradient against float64 (``check_against_reference``), fp16 and bf16, every mask kind, causal,
lengths with and without a partial last block, views of a fused qkv and padded head dims; which
inputs it takes (``ws_forward_takes``) and that sm_100 chooses it (``_ws_forward_wanted``). Its
machine code: tests/machine/test_sm100_sass.py.
"""

import pytest
import torch

import kernels
from kernels.triton import attention_fwd_ws, configs, launch
from tests.attention.test_triton import check_against_reference, make_inputs
from tests.attention.test_varlen_triton import check_varlen, cu_seqlens, packed_inputs
from tests.equivalence import DEVICE, ON_GPU

f16, bf16 = torch.float16, torch.bfloat16
# Compiled, the kernel is for sm_100 only (tcgen05, its TMA and warp-specialisation choices): forcing
# it onto another GPU would test a launch the package never makes. In the interpreter it runs anywhere.
_OTHER_GPU = ON_GPU and not configs.is_sm100(configs.target_arch(torch.empty(0, device=DEVICE)))
pytestmark = pytest.mark.interpreter


@pytest.fixture
def ws_launches(monkeypatch) -> list:
    """The launcher takes the warp-specialised kernel wherever it can; returns the list of its launches."""
    if _OTHER_GPU:
        pytest.skip("the warp-specialised forward is sm_100's: not forced onto another GPU")
    calls = []
    launch_ws = attention_fwd_ws.launch_ws_forward

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return launch_ws(*args, **kwargs)

    monkeypatch.setattr(launch, "launch_ws_forward", spy)
    monkeypatch.setattr(launch, "_ws_forward_wanted",
                        lambda q, k, v, out, dropout_p, masked=False: attention_fwd_ws.ws_forward_takes(q, k, v, out, dropout_p))
    return calls


CASES = [  # (batch, heads, Nq, Nk, D, dtype, mask)
    pytest.param(2, 2, 64, 64, 64, f16, None, id="whole-blocks-f16"),
    pytest.param(1, 2, 75, 75, 64, bf16, None, id="partial-block-bf16"),
    pytest.param(1, 2, 40, 97, 32, f16, ("bool", (1, 1, 40, 97), torch.bool), id="bool-cross-f16"),
    pytest.param(2, 1, 50, 50, 72, bf16, ("bias", (1, 1, 50, 50), bf16), id="bias-D72-bf16"),
    pytest.param(1, 1, 33, 33, 16, f16, ("bias", (1, 1, 33, 33), torch.float32), id="fp32-bias-D16-f16"),
]


@pytest.mark.parametrize(("batch", "heads", "seqlen_q", "seqlen_k", "head_dim", "dtype", "mask"), CASES)
def test_forward_and_backward_against_float64(ws_launches, batch, heads, seqlen_q, seqlen_k, head_dim, dtype, mask):
    check_against_reference(make_inputs(batch, heads, seqlen_q, seqlen_k, head_dim, dtype, mask=mask))
    assert ws_launches, "the warp-specialised kernel did not run"


@pytest.mark.parametrize("dtype", [f16, bf16])
def test_causal_and_negative_scale(ws_launches, dtype):
    check_against_reference(make_inputs(1, 2, 70, 70, 64, dtype), is_causal=True)
    check_against_reference(make_inputs(1, 1, 37, 37, 32, dtype, seed=3), scale=-0.4)
    assert len(ws_launches) == 2


def test_views_of_a_fused_qkv(ws_launches):
    """q, k, v as timm slices them: (B, N, 3, H, D) permuted, row stride 3 H D; TMA reads them in place."""
    generator = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 61, 3, 2, 48, generator=generator).to(DEVICE, bf16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = kernels.attention(q, k, v, backend="triton")
    expected = kernels.attention(q.double(), k.double(), v.double(), backend="einsum")
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)
    assert ws_launches


@pytest.mark.parametrize("fused_qkv", [True, False])
def test_packed_sequences(ws_launches, fused_qkv):
    """Each sequence's descriptors end at its last row: a sequence of 5 keys next to one of 70 reads
    zeros past its own, never its neighbour's (a NaN there would otherwise reach it as 0 * NaN)."""
    lengths = [5, 70, 33]
    tensors = packed_inputs(lengths, lengths, 2, 32, bf16, fused_qkv=fused_qkv)
    check_varlen(lengths, lengths, tensors)
    check_varlen(lengths, lengths, tensors, is_causal=True)
    assert len(ws_launches) == 2
    q, k, v = (t.detach().clone() for t in tensors)
    v[5:] = float("nan")  # the second and third sequences' values
    out = kernels.attention_varlen(q, k, v, cu_seqlens(lengths), cu_seqlens(lengths), 70, 70, backend="triton")
    assert out[:5].isfinite().all() and out[5:].isnan().all()


def test_what_it_takes():
    takes = attention_fwd_ws.ws_forward_takes
    q = torch.randn(1, 2, 10, 64, dtype=bf16)
    assert takes(q, q, q, q, 0.0)
    assert not takes(q, q, q, q, 0.1)  # dropout: the other kernel
    assert not takes(q.float(), q.float(), q.float(), q.float(), 0.0)
    odd = torch.randn(1, 2, 10, 36, dtype=bf16)  # rows 72 bytes apart: not 16-byte aligned for TMA
    assert not takes(odd, odd, odd, odd, 0.0)
    strided_head = torch.randn(1, 2, 10, 128, dtype=bf16)[..., ::2]
    assert not takes(strided_head, strided_head, strided_head, strided_head, 0.0)


def test_sm_100_chooses_it_and_sm_90_does_not(monkeypatch):
    q = torch.randn(1, 2, 10, 64, dtype=bf16)
    for arch, wanted in ((90, False), (100, True), (103, True), (120, False)):
        monkeypatch.setattr(configs, "AHEAD_OF_TIME_ARCH", arch)
        assert launch._ws_forward_wanted(q, q, q, q, 0.0) is wanted, arch
    monkeypatch.setattr(configs, "AHEAD_OF_TIME_ARCH", 100)
    padded = torch.randn(1, 2, 10, 72, dtype=bf16)  # masked, a head dim padded past 64: the 16-bit kernel
    assert launch._ws_forward_wanted(q, q, q, q, 0.0, masked=True)
    assert launch._ws_forward_wanted(padded, padded, padded, padded, 0.0)
    assert not launch._ws_forward_wanted(padded, padded, padded, padded, 0.0, masked=True)
