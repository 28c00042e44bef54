"""The shared-memory data plane on its own: messages arrive intact and in order per tag, from
any peer; oversized messages, missed deadlines and dead peers are clear errors, not hangs."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

from tessera.afd.dataplane import HEADER_TAG, PAYLOAD_TAG, RESULT_TAG, TransferError, wait
from tessera.afd.shm_plane import PlaneLimits, ShmDataPlane, shm_supported

pytestmark = pytest.mark.skipif(not shm_supported(), reason="no shared-memory plane here")

LIMITS = PlaneLimits(max_tokens=8, hidden_size=4, elem_bytes=4, top_k=0, micro_batches=2)


def _planes(tmp_path, num_attention: int = 1) -> list[ShmDataPlane]:
    """Attention ranks 0..A-1 and one FFN rank A, all in this process (one thread each to
    rendezvous, as separate processes would)."""
    ffn = num_attention
    specs = [(r, [ffn]) for r in range(num_attention)] + [(ffn, list(range(num_attention)))]
    planes: dict[int, ShmDataPlane] = {}

    def join(rank: int, peers: list[int]) -> None:
        planes[rank] = ShmDataPlane(rank, ffn + 1, str(tmp_path), LIMITS, peers, 10.0)

    threads = [threading.Thread(target=join, args=spec) for spec in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [planes[r] for r in range(ffn + 1)]


def test_round_trip_in_order_from_any_peer(tmp_path):
    a0, a1, ffn = _planes(tmp_path, num_attention=2)
    # Two micro-batches in flight from rank 0, one from rank 1: each arrives whole, in order.
    for mb in range(2):
        a0.isend(torch.tensor([0, 5, mb, 3, 0]), 2, HEADER_TAG)
        a0.isend(torch.full((3, 4), float(mb)), 2, PAYLOAD_TAG)
    a1.isend(torch.tensor([1, 5, 0, 2, 0]), 2, HEADER_TAG)
    a1.isend(torch.full((2, 4), 7.0), 2, PAYLOAD_TAG)
    header = torch.empty(5, dtype=torch.int64)
    seen = []
    for _ in range(3):
        src = ffn.recv_any(header, HEADER_TAG)
        rows = int(header[3])
        payload = torch.empty(rows, 4)
        ffn.recv(payload, src, PAYLOAD_TAG, time.monotonic() + 5)
        seen.append((src, int(header[2]), payload[0, 0].item()))
        reply = payload * 2
        ffn.isend(reply, src, RESULT_TAG + int(header[2]))
    # Peers are served round-robin; each peer's own messages keep their order.
    assert [s for s in seen if s[0] == 0] == [(0, 0, 0.0), (0, 1, 1.0)]
    assert (1, 0, 7.0) in seen
    out = torch.empty(3, 4)
    work = a0.irecv(out, 2, RESULT_TAG + 1)
    wait(work, time.monotonic() + 5, "result")
    assert torch.equal(out, torch.full((3, 4), 2.0))


def test_oversized_message_is_an_error(tmp_path):
    a0, _ = _planes(tmp_path)
    with pytest.raises(TransferError, match="exceeds its 128-byte shared-memory slot"):
        a0.isend(torch.zeros(9, 4), 1, PAYLOAD_TAG)  # 9 tokens > max_tokens 8


@pytest.mark.processes
def test_missed_deadline_and_dead_peer_fail_fast(tmp_path):
    a0, _ = _planes(tmp_path)
    out = torch.empty(2, 4)
    start = time.monotonic()
    with pytest.raises(TransferError, match="missed its deadline"):
        wait(a0.irecv(out, 1, RESULT_TAG), time.monotonic() + 0.2, "result")
    assert time.monotonic() - start < 2
    # The FFN side's pid becomes that of a process that has exited: the wait ends at once,
    # long before its deadline.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    a0.inbox[1].set_counter(a0._first, 3, dead.pid)  # the sender's pid, as rank 0 sees it
    start = time.monotonic()
    with pytest.raises(TransferError, match="peer process exited"):
        wait(a0.irecv(out, 1, RESULT_TAG), time.monotonic() + 30, "result")
    assert time.monotonic() - start < 2


def test_result_slots_fit_a_head_slice():
    # Partials [8, 4] are 128 bytes; 8 rows of a 100-column logit slice are 3200.
    limits = PlaneLimits(max_tokens=8, hidden_size=4, elem_bytes=4, top_k=0, micro_batches=2,
                         max_head_cols=100, max_sample_rows=8)
    queues = limits.queues()
    assert queues[RESULT_TAG] == queues[RESULT_TAG + 1] == (2, 3200)
    assert queues[PAYLOAD_TAG][1] == LIMITS.queues()[PAYLOAD_TAG][1] == 128
