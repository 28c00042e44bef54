"""Stall detection from heartbeats: a worker with work pending whose progress count stands still
for ``detect_s`` is stalled; an idle worker, or one waiting on a peer, never is."""

from __future__ import annotations

import threading
import time

from tessera.afd.progress import BUSY, IDLE, STALL_ENV, WAITING, Progress, ProgressWatch


def test_only_a_worker_with_work_and_no_progress_is_stalled():
    watch = ProgressWatch(["attn0", "ffn0"], detect_s=2.0, now_s=0.0)
    # Idle for an hour, then given work: its clock starts when the work does.
    watch.beat("ffn0", 0, IDLE, False, 3600.0)
    watch.beat("ffn0", 0, BUSY, False, 3600.5)
    assert watch.stalled_s("ffn0", False, 3601.0) is None
    # Busy, the count moving: fine; standing still past the bound: stalled.
    watch.beat("ffn0", 1, BUSY, False, 3602.0)
    assert watch.stalled_s("ffn0", False, 3603.5) is None
    watch.beat("ffn0", 1, BUSY, False, 3604.0)
    assert watch.stalled_s("ffn0", False, 3604.5) == 2.5
    # Waiting on a peer (a transfer with its own deadline) is not a stall, nor is idleness.
    watch.beat("ffn0", 1, WAITING, False, 3605.0)
    assert watch.stalled_s("ffn0", False, 3700.0) is None
    watch.beat("ffn0", 1, IDLE, False, 3701.0)
    assert watch.stalled_s("ffn0", False, 3800.0) is None

    # An attention worker the front gave requests to must move even if it says it is idle
    # (a main loop stuck before it took them in).
    watch.progressed("attn0", 10.0)  # requests assigned
    watch.beat("attn0", 0, IDLE, True, 11.0)
    watch.beat("attn0", 0, IDLE, True, 12.0)
    assert watch.stalled_s("attn0", True, 11.9) is None
    assert watch.stalled_s("attn0", True, 12.5) == 2.5
    assert watch.stalled_s("attn0", False, 12.6) is None  # its requests are gone


def test_waiting_restores_the_state_and_the_test_hook_stalls_one_worker(monkeypatch):
    progress = Progress("attn0.g0")
    progress.state = BUSY
    with progress.waiting():
        assert progress.state == WAITING
    assert progress.state == BUSY
    monkeypatch.setenv(STALL_ENV, "ffn0.g1:2")
    progress.tick()
    progress.tick()  # another worker's name: no stall
    assert progress.count == 2
    stalled = Progress("ffn0.g1")
    thread = threading.Thread(target=lambda: [stalled.tick() for _ in range(3)], daemon=True)
    thread.start()
    end_s = time.monotonic() + 30
    while stalled.count < 2 and time.monotonic() < end_s:
        time.sleep(0.01)
    thread.join(0.2)  # would end at once if the second tick had not blocked
    assert thread.is_alive() and stalled.count == 2
