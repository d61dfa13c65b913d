"""The einsum references and the CPU fallback.

oracle.py    the plain references every kernel must equal (attention, patch projection, varlen)
fallback.py  ``attention_fallback``: the oracle's arithmetic, chunked and memory bounded, what
             the "einsum" backend runs
"""

from kernels.reference.fallback import attention_fallback
from kernels.reference.oracle import (
    attention_reference,
    attention_varlen_masked,
    attention_varlen_reference,
    causal_mask,
    patch_embed_reference,
    safe_softmax,
)

__all__ = [
    "attention_fallback",
    "attention_reference",
    "attention_varlen_masked",
    "attention_varlen_reference",
    "causal_mask",
    "patch_embed_reference",
    "safe_softmax",
]
