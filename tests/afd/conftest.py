from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def watchdog(request):
    """Fail a hung test instead of hanging the suite (these tests drive worker processes).
    A module whose tests start several pools of slow-starting workers sets ``WATCHDOG_S``."""

    def on_alarm(signum, frame):
        raise TimeoutError("test exceeded its watchdog")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(getattr(request.module, "WATCHDOG_S", 120))
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def live_processes(marker: str) -> list[tuple[int, str, int]]:
    """(pid, command line, parent pid) of each live (not zombie) process whose command line
    holds ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, ppid = stat[0], int(stat[1])
        if marker in cmd and state != "Z":
            found.append((int(proc.name), cmd, ppid))
    return found


def worker_pids() -> list[int]:
    """Live (not zombie) worker processes whose parent is this test process."""
    return [pid for pid, _, ppid in live_processes("tessera.afd.") if ppid == os.getpid()]
