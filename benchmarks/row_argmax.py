"""The greedy pick: Tessera's row-argmax kernel vs ``torch.max(dim=-1).indices`` and
``torch.argmax`` on float32 logits (the peers, measured in the same run).

Each decode step takes the argmax of one vocabulary-wide row per sequence; on CPU ATen's
index-returning reductions run a scalar loop per row. Logits are distinct tensors per call
(``--copies``), so a call reads them from memory as a step does, not from the cache.

    python benchmarks/row_argmax.py [--threads 1,2] [--rows 1,32,256] [--vocab 32000,151936]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def ms_per_call(fn, inputs: list, repeats: int) -> float:
    """Best of ``repeats`` passes over ``inputs``, ms per call."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x in inputs:
            fn(x)
        best = min(best, (time.perf_counter() - t0) / len(inputs))
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rows", default="1,32,256")
    p.add_argument("--vocab", default="32000,151936")
    p.add_argument("--copies", type=int, default=8, help="distinct logits tensors per pass")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    try:
        threads = [int(t) for t in args.threads.split(",")]
        rows = [int(r) for r in args.rows.split(",")]
        vocabs = [int(v) for v in args.vocab.split(",")]
    except ValueError:
        p.error("--threads, --rows and --vocab take comma-separated integers")
    if min(threads + rows + vocabs + [args.copies, args.repeats]) < 1:
        p.error("every count must be at least 1")

    import torch

    from tessera.model.kernels import kernel_available, row_argmax

    if not kernel_available():
        print("the C++ kernels could not be built here; nothing to compare", file=sys.stderr)
        return 1
    print(f"{'threads':>7} {'rows':>5} {'vocab':>7} {'kernel ms':>10} {'max(dim) ms':>12} "
          f"{'argmax ms':>10} {'vs max(dim)':>12}")
    for num_threads in threads:
        torch.set_num_threads(num_threads)
        for num_rows in rows:
            for vocab in vocabs:
                g = torch.Generator().manual_seed(num_rows * vocab)
                inputs = [torch.randn(num_rows, vocab, generator=g) for _ in range(args.copies)]
                for x in inputs:  # same answers, and the kernel is built and warm
                    assert torch.equal(row_argmax(x), x.max(dim=-1).indices)
                kernel = ms_per_call(row_argmax, inputs, args.repeats)
                peer = ms_per_call(lambda x: x.max(dim=-1).indices, inputs, args.repeats)
                arg = ms_per_call(lambda x: x.argmax(dim=-1), inputs, args.repeats)
                print(f"{num_threads:>7} {num_rows:>5} {vocab:>7} {kernel:>10.3f} {peer:>12.3f} "
                      f"{arg:>10.3f} {peer / kernel:>11.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
