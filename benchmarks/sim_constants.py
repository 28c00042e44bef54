"""Grid-search one chip family's efficiency constants against its published anchors.

Prints the catalog's current constants (the row to beat) and the best grid points by their worst
error over the fitted anchors, with every anchor's error. Anchors that average a day of varying
load are shown but not fitted on (see ``simlab/anchor_fit.py``); the last line gives the
best worst-error reachable if they were.

    python benchmarks/sim_constants.py --family hopper --jobs 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.simlab.anchor_fit import (  # noqa: E402
    SEARCHED,
    GridPoint,
    catalog_values,
    evaluate,
    family_anchors,
    fitted_ids,
)
from tessera.sim.errors import SimError  # noqa: E402

DEFAULT_GRID = {
    "matmul": (0.25, 0.3, 0.35, 0.4),
    "attention": (0.45, 0.6, 0.75),
    "fabric": (0.5, 0.7, 0.9),
    "step_overhead_ms": (1.0, 3.0),
}


def _evaluate(family: str, values: dict[str, float]) -> GridPoint:
    return evaluate(family, values, family_anchors(family))


def _row(label: str, point: GridPoint, ids: list[str], fitted: list[str]) -> str:
    errs = dict(point.errors)
    vals = " ".join(f"{v:>5g}" for _, v in point.values)
    cells = " ".join(f"{errs[i]:>+8.1%}" for i in ids)
    return (f"{label:<8} {vals}  {cells}  {point.worst(fitted):>7.1%} {point.worst(ids):>7.1%}")


def main() -> int:
    """Run the search and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="hopper")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--top", type=int, default=5, help="grid points to print")
    for name, default in DEFAULT_GRID.items():
        ap.add_argument(f"--{name.replace('_', '-')}", default=",".join(map(str, default)),
                        help=f"comma-separated values (default {default})")
    ap.add_argument("--json", action="store_true", help="also print every point as JSON")
    args = ap.parse_args()
    try:
        grid = {n: [float(x) for x in getattr(args, n).split(",")] for n in SEARCHED}
        chosen = family_anchors(args.family)
        current = catalog_values(args.family)
    except (SimError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ids = [a.anchor_id for a in chosen]
    fitted = fitted_ids(chosen)
    combos = [dict(zip(SEARCHED, c, strict=True)) for c in _product(grid)]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        points = list(pool.map(_evaluate, [args.family] * (len(combos) + 1), [current, *combos]))
    wall = time.perf_counter() - start
    base, rest = points[0], points[1:]
    ranked = sorted(rest, key=lambda p: p.worst(fitted))
    head = " ".join(f"{n[:5]:>5}" for n in sorted(SEARCHED))
    print(f"family {args.family}: {len(combos)} grid points, {len(ids)} anchors"
          f" ({len(ids) - len(fitted)} not fitted: day averages, held-out checks); {wall:.0f} s")
    for k, a in enumerate(chosen):
        why = "" if a.anchor_id in fitted else (
            "  (time average)" if a.time_average else "  (held out: not in published.json)")
        print(f"  [{k}] {a.anchor_id}{why}")
    cols = " ".join(f"{'[' + str(k) + ']':>8}" for k in range(len(ids)))
    print(f"{'':<8} {head}  {cols}  {'fitted':>7} {'all':>7}")
    print(_row("catalog", base, ids, fitted))
    for rank, p in enumerate(ranked[:args.top], 1):
        print(_row(f"#{rank}", p, ids, fitted))
    summary = f"best worst error over the fitted anchors {ranked[0].worst(fitted):.1%}"
    if len(fitted) < len(ids):
        best_all = min(rest, key=lambda p: p.worst(ids))
        print(_row("best-all", best_all, ids, fitted))
        summary += f"; over all anchors {best_all.worst(ids):.1%}"
    print(summary)
    if args.json:
        print(json.dumps([{"values": dict(p.values), "errors": dict(p.errors)} for p in points]))
    return 0


def _product(grid: dict[str, list[float]]) -> list[tuple[float, ...]]:
    return list(itertools.product(*(grid[n] for n in SEARCHED)))


if __name__ == "__main__":
    sys.exit(main())
