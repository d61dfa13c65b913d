"""The Triton kernels and their host side: attention (forward, backward, varlen) and the patch projection.

configs.py        autotune tables, mask kinds, head-dim range
tiles.py          jit helpers every attention kernel shares (logits and masks, dropout, loads)
attention_fwd.py  the forward kernel
attention_bwd.py  the backward kernels (delta pre-pass, dK/dV, dQ) and the dropout keep mask
launch.py         the grid, constexprs, dense/packed layouts, one launcher per pass
attention_ops.py  custom ops, autograd, ``attention_triton`` / ``attention_varlen_triton``
patch_embed.py    the patch projection: kernels, custom ops, ``patch_embed_triton``
utils.py          the interpreter switch, the one dot product, bf16 rounding

Each is checked against ``kernels.reference`` (tests/attention/test_triton.py,
tests/attention/test_varlen_triton.py, tests/patch_embed/test_triton.py).
"""
