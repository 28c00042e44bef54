"""What the engine needs to know about a device: its torch device, free memory, how to wait
for it, and which torch.distributed backend speaks to it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from tessera.platform.host_memory import keep_freed_host_memory


@dataclass(frozen=True)
class Platform:
    """A device kind as the engine sees it."""

    name: str
    """cpu or cuda (an NPU backend would add its own name)."""
    device: torch.device
    dist_backend: str
    """torch.distributed backend for the data plane (gloo, nccl; hccl for Ascend)."""

    def free_memory_bytes(self) -> int:
        if self.name == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(self.device)
            return int(free_bytes)
        return _available_host_memory_bytes()

    def prepare_process(self) -> None:
        """Per-process set-up before a model loads. Host tensors use the host allocator on
        every device kind (on CPU, all of them), so freed large blocks are kept for reuse
        (see ``host_memory``)."""
        keep_freed_host_memory()

    def synchronize(self) -> None:
        if self.name == "cuda":
            torch.cuda.synchronize(self.device)



def _available_host_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def get_platform(device: str) -> Platform:
    """Resolve ``device`` (cpu, cuda, cuda:N or auto) to a platform, with a clear error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but no CUDA device is available")
        return Platform("cuda", torch.device(device), "nccl")
    if device == "cpu":
        return Platform("cpu", torch.device("cpu"), "gloo")
    raise ValueError(f"unknown device {device!r}; expected cpu, cuda or auto")
