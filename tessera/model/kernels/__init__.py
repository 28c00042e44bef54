"""Optional native kernels; each has a pure-torch fallback with the same semantics.

Nothing is compiled on import: the kernels are built the first time one is called.
"""

from tessera.model.kernels.argmax import row_argmax
from tessera.model.kernels.build import kernel_available, kernels_disabled
from tessera.model.kernels.fused import apply_rotary_, rms_norm, silu_mul
from tessera.model.kernels.paged_decode import paged_decode_attention, paged_decode_reference

__all__ = [
    "apply_rotary_",
    "kernel_available",
    "kernels_disabled",
    "paged_decode_attention",
    "paged_decode_reference",
    "rms_norm",
    "row_argmax",
    "silu_mul",
]
