"""The Triton kernels and their host side: attention (forward, backward, varlen) and the patch projection.

configs.py              autotune tables and their pruning (per arch), mask kinds
tiles.py                jit helpers every attention kernel shares (logits and masks, dropout, loads)
attention_fwd.py        the forward kernel (its narrow last block: ``_forward_tail``)
attention_fwd_ws.py     the warp-specialised forward sm_100 runs (TMA descriptors, partitions by role)
attention_bwd.py        the backward's delta pre-pass, dK/dV kernel, and the dropout keep mask
attention_bwd_dq.py     the backward's dQ kernel (and the bias gradient)
attention_bwd_fused.py  the one-kernel backward (dQ by atomic adds), for long sequences
attention_fp8.py        the FP8 (e4m3) inference forward: kernel, custom op, ``attention_fp8_triton``
launch.py               the grid, constexprs, dense/packed layouts, one launcher per pass, fused or pair
attention_ops.py        custom ops, autograd, ``attention_triton`` / ``attention_varlen_triton``
sharding.py             DTensor sharding rules of every custom op
patch_embed.py          the patch projection: kernels, custom ops, ``patch_embed_triton``
patch_embed_configs.py  its autotune tables and pruning
utils.py                the interpreter switch, the one dot product, bf16 rounding

Each is checked against ``kernels.reference`` (tests/attention/test_triton.py,
tests/attention/test_varlen_triton.py, test_fused_backward.py, test_narrow_last_block.py,
tests/attention/test_fp8.py, test_ws_forward.py, tests/patch_embed/test_triton.py); their machine code in tests/machine/.
"""
