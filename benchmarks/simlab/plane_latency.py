"""Measure the one-way time of a data-plane message between two local worker processes.

What ``benchmarks.simlab.afd_local`` charges per FFN request and per result: a request of ``rows``
hidden states goes from this process to an echo process over the shared-memory plane
(``tessera.afd.shm_plane``, the one local CPU workers use), which answers with the same tensor;
half the median round trip is the one-way time. It covers what a real transfer costs beyond
the two workers' compute: the sender's copy in, the receiver noticing it, its copy out.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tessera.sim.errors import SimError

REPO_ROOT = Path(__file__).resolve().parents[2]


def _limits(hidden_size: int, rows: int):  # noqa: ANN202 (torch-side type, imported lazily)
    from tessera.afd.shm_plane import PlaneLimits

    return PlaneLimits(max_tokens=rows, hidden_size=hidden_size, elem_bytes=4, top_k=0,
                       micro_batches=1)


def echo(directory: str, hidden_size: int, rows: int, repeats: int) -> None:
    """The echo side (run in a child process): answer ``repeats`` requests, then exit."""
    import torch

    from tessera.afd.dataplane import HEADER_TAG, PAYLOAD_TAG, RESULT_TAG
    from tessera.afd.shm_plane import ShmDataPlane

    torch.set_num_threads(1)
    plane = ShmDataPlane(1, 2, directory, _limits(hidden_size, rows), [0], 30.0)
    header = torch.empty(5, dtype=torch.int64)
    payload = torch.empty(rows, hidden_size)
    for _ in range(repeats):
        plane.recv_any(header, HEADER_TAG)
        plane.recv(payload, 0, PAYLOAD_TAG, time.monotonic() + 30.0)
        plane.isend(payload, 0, RESULT_TAG)


def measure_plane_latency_s(hidden_size: int, rows: int, repeats: int = 300) -> float:
    """One-way seconds of a [rows, hidden_size] float32 message between local processes."""
    import torch

    from tessera.afd.dataplane import HEADER_TAG, PAYLOAD_TAG, RESULT_TAG, wait
    from tessera.afd.shm_plane import SHM_DIR, ShmDataPlane, shm_supported

    if not shm_supported():
        raise SimError("this host has no shared-memory data plane to measure")
    with tempfile.TemporaryDirectory(prefix="tessera-latency-", dir=SHM_DIR) as directory:
        code = (f"from benchmarks.simlab.plane_latency import echo; "
                f"echo({directory!r}, {hidden_size}, {rows}, {repeats})")
        # From the repository root, where ``benchmarks`` imports as a package.
        child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT)
        try:
            plane = ShmDataPlane(0, 2, directory, _limits(hidden_size, rows), [1], 60.0)
            header = torch.tensor([0, 0, 0, rows, 0])
            x = torch.ones(rows, hidden_size)
            y = torch.empty_like(x)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                plane.isend(header, 1, HEADER_TAG)
                plane.isend(x, 1, PAYLOAD_TAG)
                wait(plane.irecv(y, 1, RESULT_TAG), time.monotonic() + 30.0, "echo")
                times.append(time.perf_counter() - start)
        finally:
            if child.wait(30) != 0:
                raise SimError("the latency echo process failed")
    return statistics.median(times) / 2.0
