"""A shared-memory data plane for workers on one host: the same calls as ``DataPlane``.

Why not gloo on one host: each gloo transfer hops through an I/O thread and a loopback socket
on both sides. On a host whose cores are all busy computing (one per worker), those threads
must preempt a compute thread to run, so a round trip costs far more than its copying. Here the compute threads copy the tensors themselves, through files
mapped in shared memory (a tmpfs such as ``/dev/shm``), and the receiver polls a counter.

Layout: one file per ordered pair of ranks (``src-dst``), created by the receiver. It holds
one FIFO queue per tag, each ``num_slots`` slots of a fixed capacity, and two counters per
queue: messages written (bumped by the sender after the slot's bytes) and messages read
(bumped by the receiver after copying them out). A sender whose queue is full waits; a message
larger than its slot is an error (slot capacities come from the engine's limits, see
``PlaneLimits``). Publishing with plain stores relies on the CPU keeping stores in order
(x86-64's model); ``shm_supported`` says where it is used.

Waits poll: yielding the core for the first 50 ms (longer than a layer's compute on the other
side), then sleeps that back off to 2 ms, so an idle worker costs little. Every wait has a
deadline, and a peer
whose process has exited fails the wait at once (as gloo reports a reset connection).
"""

from __future__ import annotations

import datetime
import mmap
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tessera.afd.dataplane import (
    HEADER_LEN,
    HEADER_TAG,
    IDS_TAG,
    PAYLOAD_TAG,
    RESULT_TAG,
    WEIGHTS_TAG,
    TransferError,
    wait,
)

_ALIGN = 64
_COUNTERS = 4  # per queue: written, read, and the two peers' pids in queue 0
_PEER_CHECK_S = 0.02
_YIELD_S = 0.05
_MAX_SLEEP_S = 0.002


SHM_DIR = "/dev/shm"


def shm_supported(directory: str = SHM_DIR) -> bool:
    """Whether this host can run the shared-memory plane: a tmpfs to map and a CPU that keeps
    stores in order (x86-64)."""
    return platform.machine() in ("x86_64", "AMD64") and os.path.isdir(directory)


@dataclass(frozen=True)
class PlaneLimits:
    """The largest message of each kind, from the engine's limits (the same on every rank)."""

    max_tokens: int
    """Tokens of one step: ``max_num_batched_tokens`` (the scheduler never exceeds it)."""
    hidden_size: int
    elem_bytes: int
    """Bytes per element of the model's dtype (hidden states and logits travel in it)."""
    top_k: int
    """Experts per token (0 for a dense model)."""
    micro_batches: int
    max_head_cols: int = 0
    """Widest slice of the LM head's logits one FFN worker returns (0: it holds none)."""
    max_sample_rows: int = 0
    """Most rows one step samples (the rows an LM head request carries)."""

    def queues(self) -> dict[int, tuple[int, int]]:
        """tag -> (slots, bytes per slot). Requests: one in flight per micro-batch. Results:
        one tag per micro-batch, one in flight each; a result is a partial [T, D] or a slice
        of logits [S, V_f]."""
        hidden = self.max_tokens * self.hidden_size * self.elem_bytes
        logits = self.max_sample_rows * self.max_head_cols * self.elem_bytes
        depth = self.micro_batches + 1
        queues = {HEADER_TAG: (depth, HEADER_LEN * 8), PAYLOAD_TAG: (depth, hidden)}
        if self.top_k:
            queues[IDS_TAG] = (depth, self.max_tokens * self.top_k * 8)
            queues[WEIGHTS_TAG] = (depth, self.max_tokens * self.top_k * 4)
        for mb in range(self.micro_batches):
            queues[RESULT_TAG + mb] = (2, max(hidden, logits))
        return queues


def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class _Channel:
    """The mapped file of one ordered pair: its queues' counters and slots."""

    def __init__(self, path: Path, limits: PlaneLimits, create: bool) -> None:
        self.queues = limits.queues()
        tags = sorted(self.queues)
        self.index = {tag: i for i, tag in enumerate(tags)}
        self.offsets: dict[int, int] = {}
        offset = _round_up(len(tags) * _COUNTERS * 8)
        for tag in tags:
            num_slots, size = self.queues[tag]
            self.offsets[tag] = offset
            offset += num_slots * _round_up(max(size, 1))
        self.nbytes = offset
        if create:
            # Created under a temporary name and renamed, so a peer never maps a short file.
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                # Allocate every page now: a page first touched mid-serving faults and is
                # zeroed then, which made the first large (prefill) messages cost ms each.
                os.posix_fallocate(f.fileno(), 0, self.nbytes)
            tmp.rename(path)
        with open(path, "r+b") as f:
            self.mm = mmap.mmap(f.fileno(), self.nbytes)
        self.buf = torch.frombuffer(self.mm, dtype=torch.uint8)  # [nbytes]
        # The counters as a memoryview of int64: a read or write is one aligned 8-byte access
        # of a Python int, about 50x cheaper than indexing a tensor, and each FFN round trip
        # reads and writes them a dozen times (waiters poll them).
        self.counters = memoryview(self.mm)[:len(tags) * _COUNTERS * 8].cast("q")

    def counter(self, tag: int, which: int) -> int:
        return self.counters[self.index[tag] * _COUNTERS + which]

    def set_counter(self, tag: int, which: int, value: int) -> None:
        self.counters[self.index[tag] * _COUNTERS + which] = value

    def slot(self, tag: int, seq: int, nbytes: int) -> torch.Tensor:
        num_slots, size = self.queues[tag]
        if nbytes > size:
            raise TransferError(
                f"a message of {nbytes} bytes exceeds its {size}-byte shared-memory slot"
            )
        start = self.offsets[tag] + (seq % num_slots) * _round_up(max(size, 1))
        return self.buf[start:start + nbytes]


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not known yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited child its parent has not reaped yet is a zombie: dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class _Poller:
    """Yield the core for a while, then sleep with back-off; raises at a dead peer.

    Yielding (not sleeping) for the first ``_YIELD_S`` keeps a waiter's wake-up within
    microseconds through a layer's compute on the other side (a few ms); a sleeping waiter
    would wake up to its sleep late, and that lands on every FFN round trip. Past that the
    peer is idle, not computing, and back-off sleeps cost little CPU."""

    def __init__(self, deadline_s: float, peers: Callable[[], Sequence[int]]) -> None:
        self.deadline_s = deadline_s
        self.peers = peers
        self.start_s = time.monotonic()
        self.sleep_s = 100e-6
        self.next_check_s = self.start_s + _PEER_CHECK_S

    def pause(self) -> bool:
        """Wait a little; False once the deadline has passed."""
        now = time.monotonic()
        if now - self.start_s < _YIELD_S:
            os.sched_yield()
        else:
            time.sleep(self.sleep_s)
            self.sleep_s = min(self.sleep_s * 2, _MAX_SLEEP_S)
            now = time.monotonic()
        if now >= self.next_check_s:
            self.next_check_s = now + _PEER_CHECK_S
            if not all(_alive(pid) for pid in self.peers()):
                raise RuntimeError("peer process exited")
        return now < self.deadline_s


class _Work:
    """A send (done when issued) or a receive (done when its message is copied out)."""

    def __init__(self, plane: ShmDataPlane, tensor: torch.Tensor | None = None,
                 src: int = -1, tag: int = 0) -> None:
        self.plane, self.tensor, self.src, self.tag = plane, tensor, src, tag
        self.done = tensor is None

    def is_completed(self) -> bool:
        if not self.done:
            assert self.tensor is not None
            self.done = self.plane.try_recv(self.tensor, self.src, self.tag)
        return self.done

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        if self.done:
            return True
        deadline_s = time.monotonic() + (timeout.total_seconds() if timeout else 1e9)
        poller = _Poller(deadline_s, lambda: [self.plane.pid_of(self.src)])
        while not self.is_completed():
            if not poller.pause():
                return False
        return True


class ShmDataPlane:
    """This process's end of the shared-memory plane (ranks as in ``DataPlane``)."""

    def __init__(self, rank: int, world_size: int, directory: str, limits: PlaneLimits,
                 peers: Sequence[int], timeout_s: float, names: Sequence[str] | None = None,
                 ) -> None:
        """``peers``: the ranks this one exchanges with (attention ranks talk to FFN ranks)."""
        self.rank = rank
        self.world_size = world_size
        self.names = list(names) if names is not None else [f"rank {r}" for r in range(world_size)]
        self.peers = list(peers)
        self.timeout_s = timeout_s
        root = Path(directory)
        self.inbox = {src: _Channel(root / f"{src}-{rank}", limits, create=True)
                      for src in self.peers}
        deadline_s = time.monotonic() + timeout_s
        self.outbox: dict[int, _Channel] = {}
        for dst in self.peers:
            path = root / f"{rank}-{dst}"
            while not path.exists():
                if time.monotonic() > deadline_s:
                    raise TransferError(f"{self.names[dst]} did not join the data plane")
                time.sleep(0.01)
            self.outbox[dst] = _Channel(path, limits, create=False)
        # The queue-0 counters 2 and 3 carry the pids: the receiver's, then the sender's.
        first = min(limits.queues())
        for ch in self.inbox.values():
            ch.set_counter(first, 2, os.getpid())
        for ch in self.outbox.values():
            ch.set_counter(first, 3, os.getpid())
        self._first = first
        self._next_src = 0

    def pid_of(self, peer: int) -> int:
        """The peer's pid once it has mapped the pair (0 before)."""
        if peer in self.inbox:
            return self.inbox[peer].counter(self._first, 3)
        return self.outbox[peer].counter(self._first, 2)

    def isend(self, tensor: torch.Tensor, dst: int, tag: int) -> _Work:
        """Copy ``tensor`` into ``dst``'s queue for ``tag`` now (waiting for a free slot)."""
        ch = self.outbox[dst]
        num_slots, _ = ch.queues[tag]
        written = ch.counter(tag, 0)
        if written - ch.counter(tag, 1) >= num_slots:  # not in our protocol; but never hang
            poller = _Poller(time.monotonic() + self.timeout_s, lambda: [self.pid_of(dst)])
            try:
                while written - ch.counter(tag, 1) >= num_slots:
                    if not poller.pause():
                        raise TransferError(f"send to {self.names[dst]} missed its deadline")
            except RuntimeError as e:
                raise TransferError(f"send to {self.names[dst]} failed: {e}") from e
        data = _bytes(tensor.contiguous())
        ch.slot(tag, written, data.numel()).copy_(data)
        ch.set_counter(tag, 0, written + 1)  # publish: after the bytes (stores stay in order)
        return _Work(self)

    def try_recv(self, tensor: torch.Tensor, src: int, tag: int) -> bool:
        """Copy the next message of ``tag`` from ``src`` into ``tensor`` if it has arrived."""
        ch = self.inbox[src]
        read = ch.counter(tag, 1)
        if ch.counter(tag, 0) <= read:
            return False
        data = _bytes(tensor)
        data.copy_(ch.slot(tag, read, data.numel()))
        ch.set_counter(tag, 1, read + 1)
        return True

    def irecv(self, tensor: torch.Tensor, src: int, tag: int) -> _Work:
        return _Work(self, tensor, src, tag)

    def recv_any(self, tensor: torch.Tensor, tag: int) -> int:
        """Block until a message with ``tag`` arrives from any peer; returns that rank.
        Peers are polled round-robin, so a busy one cannot starve the others."""
        poller = _Poller(float("inf"), lambda: [self.pid_of(p) for p in self.peers])
        while True:
            src = self.poll_any(tensor, tag)
            if src is not None:
                return src
            try:
                poller.pause()
            except RuntimeError as e:
                raise TransferError(f"receive failed: {e}") from e

    def poll_any(self, tensor: torch.Tensor, tag: int) -> int | None:
        """Like ``recv_any`` if a message has arrived; None at once if none has."""
        for i in range(len(self.peers)):
            src = self.peers[(self._next_src + i) % len(self.peers)]
            if self.try_recv(tensor, src, tag):
                self._next_src = (self._next_src + i + 1) % len(self.peers)
                return src
        return None

    def recv(self, tensor: torch.Tensor, src: int, tag: int, deadline_s: float) -> None:
        wait(self.irecv(tensor, src, tag), deadline_s, f"receive from {self.names[src]}")

    def close(self) -> None:
        pass  # the files go with the pool's directory; mappings with the process
