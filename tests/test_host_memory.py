"""The host allocator keeps freed large blocks: a step's activations stop faulting in pages."""

from __future__ import annotations

import resource

import pytest
import torch

from tessera.platform.host_memory import keep_freed_host_memory

# Activation sizes of a prefill step of a small model, as the engine allocates and frees them.
_SIZES_BYTES = [8 << 20, 16 << 20, 4 << 20, 24 << 20, 2 << 20]


def _step_faults() -> int:
    """Minor page faults of one emulated step: each buffer is touched, and only the two most
    recent are alive at a time."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    alive: list[torch.Tensor] = []
    for num_bytes in _SIZES_BYTES:
        buf = torch.empty(num_bytes // 4, dtype=torch.float32)
        buf.fill_(1.0)
        alive.append(buf)
        if len(alive) > 2:
            alive.pop(0)
    del alive
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_steps_stop_faulting_after_warm_up():
    if not keep_freed_host_memory():
        pytest.skip("not glibc malloc")
    pages = sum(_SIZES_BYTES) // resource.getpagesize()
    faults = [_step_faults() for _ in range(8)]
    # With glibc's defaults every step faults in nearly all its pages again (12,768 of 13,824
    # measured), as freed blocks are unmapped or trimmed; kept, later steps reuse them.
    assert sum(faults[4:]) < pages // 10, faults
