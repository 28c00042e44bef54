"""The data plane: hidden states between attention and FFN workers over torch.distributed p2p.

The backend comes from the platform (gloo on CPU; nccl/hccl where a device brings its own), so
an accelerator plugs in without changes here. CPU workers on one host use the shared-memory
plane instead (``shm_plane.py``, same calls); ``planes.open_plane`` picks the one a worker is given. Every wait has a deadline; a transfer that fails
or misses it raises ``TransferError``, after which the group is unusable (a collective group
does not survive a dead member) and the front rebuilds the whole pool on a fresh port.

Message layout, per FFN request: a small int64 header ``[src_rank, layer_id, micro_batch,
num_tokens, top_k]`` (tag ``HEADER_TAG``), then the payload from the same rank (tag
``PAYLOAD_TAG``): the normed hidden ``[T, D]``, and for MoE layers (``top_k > 0``) the expert
ids ``[T, k]`` int64 (``IDS_TAG``) and routing weights ``[T, k]`` float32 (``WEIGHTS_TAG``). The FFN worker receives headers from any source, so attention workers never
wait for one another; it answers with a partial ``[T, D]`` on tag ``RESULT_TAG + micro_batch``.
"""

from __future__ import annotations

import datetime
import errno
import re
import socket
import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

HEADER_TAG = 1
PAYLOAD_TAG = 2
IDS_TAG = 3
WEIGHTS_TAG = 4
RESULT_TAG = 16
HEADER_LEN = 5
_IDLE_WAIT = datetime.timedelta(days=365)


class TransferError(RuntimeError):
    """A data-plane transfer failed or missed its deadline."""


class Work(Protocol):
    """A transfer in flight (``torch.distributed.Work`` or the shared-memory plane's)."""

    def wait(self, timeout: datetime.timedelta = ...) -> bool: ...

    def is_completed(self) -> bool: ...


class Plane(Protocol):
    """What the workers use of a data plane (``DataPlane``, ``ShmDataPlane``)."""

    rank: int
    names: list[str]

    def isend(self, tensor: torch.Tensor, dst: int, tag: int) -> Work: ...

    def irecv(self, tensor: torch.Tensor, src: int, tag: int) -> Work: ...

    def recv_any(self, tensor: torch.Tensor, tag: int) -> int: ...

    def poll_any(self, tensor: torch.Tensor, tag: int) -> int | None: ...

    def recv(self, tensor: torch.Tensor, src: int, tag: int, deadline_s: float) -> None: ...

    def close(self) -> None: ...


class DataPlane:
    """This process's membership in the data-plane group (attention ranks, then FFN ranks).

    Nothing of it listens on every interface: rank 0 serves the rendezvous store on
    ``master_addr`` only (a socket bound here and handed to the store, whose own listener
    would take all interfaces), and gloo's pairs listen on ``host_addr``, this worker's
    address in the pool. Other backends join through the same store."""

    def __init__(
        self, rank: int, world_size: int, master_addr: str, master_port: int, backend: str,
        timeout_s: float, names: Sequence[str] | None = None, host_addr: str = "127.0.0.1",
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        # Errors name the peer as the user knows it (ffn1), not by its rank: the front reports
        # them as the cause of a pool failure.
        self.names = list(names) if names is not None else [f"rank {r}" for r in range(world_size)]
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = rendezvous_store(rank, world_size, master_addr, master_port, timeout)
        if backend == "gloo":
            gloo: Any = dist.ProcessGroupGloo  # its stubs lack _Options, which takes devices
            options = gloo._Options()
            options._timeout = timeout
            options._devices = [gloo.create_device(hostname=host_addr)]
            self.group: Any = gloo(self.store, rank, world_size, options)
        else:
            dist.init_process_group(backend, store=self.store, rank=rank,
                                    world_size=world_size, timeout=timeout)
            self.group = dist.group.WORLD

    def isend(self, tensor: torch.Tensor, dst: int, tag: int) -> dist.Work:
        try:
            return self.group.send([tensor], dst, tag)
        except RuntimeError as e:
            raise TransferError(f"send to {self.names[dst]} failed: {brief(e)}") from e

    def irecv(self, tensor: torch.Tensor, src: int, tag: int) -> dist.Work:
        try:
            return self.group.recv([tensor], src, tag)
        except RuntimeError as e:
            raise TransferError(f"receive from {self.names[src]} failed: {brief(e)}") from e

    def recv_any(self, tensor: torch.Tensor, tag: int) -> int:
        """Block until a message with ``tag`` arrives from any rank; returns that rank."""
        try:
            work = self.group.recv_anysource([tensor], tag)
            # An explicit long wait: the group's default timeout would end an idle worker.
            work.wait(_IDLE_WAIT)
            return int(work._source_rank())
        except RuntimeError as e:
            raise TransferError(f"receive failed: {brief(e)}") from e

    def poll_any(self, tensor: torch.Tensor, tag: int) -> int | None:
        """Never a message: gloo cannot test a receive from any source without waiting for it
        (its work reports completion only from ``wait``), so on this plane a caller that
        looks for more queued messages finds none and goes on with what it has."""
        return None

    def recv(self, tensor: torch.Tensor, src: int, tag: int, deadline_s: float) -> None:
        wait(self.irecv(tensor, src, tag), deadline_s, f"receive from {self.names[src]}")

    def close(self) -> None:
        if self.group is dist.group.WORLD and dist.is_initialized():
            dist.destroy_process_group()


def rendezvous_store(rank: int, world_size: int, master_addr: str, master_port: int,
                     timeout: datetime.timedelta) -> dist.TCPStore:
    """The data plane's rendezvous store: served by rank 0 on ``master_addr:master_port``
    only, joined there by the others. OSError if the port is taken."""
    if rank != 0:
        return dist.TCPStore(master_addr, master_port, world_size, False, timeout)
    listener = socket.socket(socket.AF_INET6 if ":" in master_addr else socket.AF_INET)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((master_addr, master_port))
        listener.listen()
    except OSError as e:
        listener.close()
        if e.errno == errno.EADDRINUSE:
            raise OSError(f"data-plane rendezvous port {master_port} is already in use") from e
        raise
    # The store owns the socket from here on (and closes it).
    return dist.TCPStore(master_addr, master_port, world_size, True, timeout,
                         wait_for_workers=False, master_listen_fd=listener.detach())


def brief(error: Exception) -> str:
    """The gist of a backend error: its first sentence, without gloo's source location."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().splitlines()[0])
    return text.split(". ")[0].rstrip(".")


def wait(work: Work, deadline_s: float, what: str) -> None:
    """Wait for ``work`` until ``deadline_s`` (``time.monotonic`` seconds)."""
    remaining = deadline_s - time.monotonic()
    if remaining <= 0:
        raise TransferError(f"{what} missed its deadline")
    try:
        ok = work.wait(datetime.timedelta(seconds=remaining))
    except RuntimeError as e:
        raise TransferError(f"{what} failed: {brief(e)}") from e
    if ok is False:
        raise TransferError(f"{what} missed its deadline")
