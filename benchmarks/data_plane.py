"""One FFN round trip on each data plane: the shared-memory plane vs torch.distributed (gloo
over loopback TCP, its peer), two processes, one thread each.

A round trip is what an attention worker and an FFN worker exchange per layer and micro-batch:
the attention side posts the receive for the result, sends the header and the normed hidden
state ``[T, D]``; the FFN side takes the header from any rank, receives the payload and sends
back a ``[T, D]`` result (no compute in between). Reported per row count: microseconds per round
trip (best of ``--repeats`` passes, median inside each) and the bytes moved per second.

    python benchmarks/data_plane.py [--rows 1,32,256] [--hidden 768] [--iters 2000]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _open(kind: str, rank: int, shm_dir: str, port: int, max_rows: int, hidden: int):
    from tessera.afd.dataplane import DataPlane
    from tessera.afd.shm_plane import PlaneLimits, ShmDataPlane

    if kind == "torch":
        return DataPlane(rank, 2, "127.0.0.1", port, "gloo", 60.0)
    limits = PlaneLimits(max_tokens=max_rows, hidden_size=hidden, elem_bytes=4, top_k=0,
                         micro_batches=1)
    return ShmDataPlane(rank, 2, shm_dir, limits, [1 - rank], 60.0)


def _worker(kind: str, rank: int, shm_dir: str, port: int, rows: list[int], hidden: int,
            iters: int, repeats: int, out) -> None:
    import torch

    from tessera.afd.dataplane import HEADER_LEN, HEADER_TAG, PAYLOAD_TAG, RESULT_TAG

    torch.set_num_threads(1)
    plane = _open(kind, rank, shm_dir, port, max(rows), hidden)
    deadline = time.monotonic() + 600
    results = {}
    for num_rows in rows:
        x = torch.randn(num_rows, hidden)
        header = torch.empty(HEADER_LEN, dtype=torch.int64)
        passes = []
        for _ in range(repeats):
            times = []
            for _ in range(iters):
                if rank == 0:  # the attention side, timed
                    t0 = time.perf_counter()
                    result = torch.empty_like(x)
                    recv = plane.irecv(result, 1, RESULT_TAG)
                    sent = [plane.isend(torch.tensor([0, 0, 0, num_rows, 0]), 1, HEADER_TAG),
                            plane.isend(x, 1, PAYLOAD_TAG)]
                    recv.wait()
                    for work in sent:
                        work.wait()
                    times.append(time.perf_counter() - t0)
                else:  # the FFN side: header from any rank, payload, reply
                    src = plane.recv_any(header, HEADER_TAG)
                    payload = torch.empty(int(header[3]), hidden)
                    plane.recv(payload, src, PAYLOAD_TAG, deadline)
                    plane.isend(payload, src, RESULT_TAG).wait()
            passes.append(statistics.median(times) if times else 0.0)
        results[num_rows] = min(passes)
    if rank == 0:
        out.put(results)
    plane.close()


def measure(kind: str, rows: list[int], hidden: int, iters: int, repeats: int) -> dict[int, float]:
    """Seconds per round trip by row count on plane ``kind`` (``shm`` or ``torch``)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        port = _free_port()
        procs = [ctx.Process(target=_worker,
                             args=(kind, r, d, port, rows, hidden, iters, repeats, out))
                 for r in (0, 1)]
        for p in procs:
            p.start()
        results = out.get(timeout=900)
        for p in procs:
            p.join(timeout=60)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rows", default="1,32,256")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        p.error("--rows takes comma-separated integers")
    if min(rows + [args.hidden, args.iters, args.repeats]) < 1:
        p.error("every count must be at least 1")
    from tessera.afd.shm_plane import shm_supported

    kinds = (["shm"] if shm_supported() else []) + ["torch"]
    timed = {kind: measure(kind, rows, args.hidden, args.iters, args.repeats) for kind in kinds}
    print(f"{'rows':>5} {'bytes each way':>15} " + " ".join(
        f"{kind + ' us':>10} {kind + ' GB/s':>10}" for kind in kinds)
        + ("  torch/shm" if len(kinds) == 2 else ""))
    for num_rows in rows:
        nbytes = num_rows * args.hidden * 4
        line = f"{num_rows:>5} {nbytes:>15}"
        for kind in kinds:
            s = timed[kind][num_rows]
            line += f" {s * 1e6:>10.1f} {2 * nbytes / s / 1e9:>10.2f}"
        if len(kinds) == 2:
            line += f"  {timed['torch'][num_rows] / timed['shm'][num_rows]:>8.1f}x"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
