"""Optional native kernels; each has a pure-torch fallback with the same semantics.

Nothing is compiled on import: a kernel is built the first time it is called.
"""

from tessera.model.kernels.paged_decode import (
    kernel_available,
    kernels_disabled,
    paged_decode_attention,
    paged_decode_reference,
)

__all__ = [
    "kernel_available",
    "kernels_disabled",
    "paged_decode_attention",
    "paged_decode_reference",
]
