"""Print published vs simulated figures for every result in published.json.

The mapping from each anchor's text to a scenario is documented in
:mod:`tessera.sim.validation`, which also adds one held-out capacity figure from another cited
source (marked ``*``; the constants were fitted without it). A decode figure published with a
TPOT gets a line comparing it with the simulated mean TPOT. An anchor that averages a day of
varying load gets a line with the average utilization it implies and with the capacity of the
same deployment that its operator published.

Exit status 1 when a capacity figure misses by more than 15%, or when a day average exceeds
the simulated capacity (it can only bound capacity from below); the last line gives the worst
error over every row as well.
"""

from __future__ import annotations

import sys
import time

from tessera.sim.validation import (
    anchors,
    best_result,
    nodes_in_service_check,
    profile_over_blog,
)

TOLERANCE = 0.15


def main() -> int:
    """Run every anchor and print the table."""
    print(f"{'anchor':<36} {'metric':<30} {'published':>10} {'simulated':>10} {'error':>8}")
    worst_capacity = worst_all = 0.0
    bounded = True
    start = time.perf_counter()
    for anchor in anchors():
        result = best_result(anchor)
        sim = float(getattr(result, anchor.metric))
        err = (sim - anchor.published) / anchor.published
        worst_all = max(worst_all, abs(err))
        if anchor.time_average:
            bounded = bounded and sim >= anchor.published
        else:
            worst_capacity = max(worst_capacity, abs(err))
        mark = "" if anchor.in_published else " *"
        print(f"{anchor.anchor_id + mark:<36} {anchor.metric:<30} {anchor.published:>10.0f}"
              f" {sim:>10.0f} {err:>+8.1%}")
        if anchor.tpot_ms is not None:
            tpot_err = result.tpot_ms_mean / anchor.tpot_ms - 1.0
            print(f"  TPOT: published {anchor.tpot_ms:.1f} ms, simulated"
                  f" {result.tpot_ms_mean:.1f} ms ({tpot_err:+.1%}; the batch is published tok/s x TPOT,"
                  f" so not an independent check)")
        if anchor.time_average:
            implied, blog = nodes_in_service_check()
            print(f"  a day average, not a capacity: day totals / per-node rates = {implied:.1f}"
                  f" nodes in service (the blog: {blog}); simulated capacity implies"
                  f" {anchor.published / sim:.0%} average utilization; DeepSeek's own profile of"
                  f" this prefill deployment (4K prompts) is {profile_over_blog():.2f}x it")
        if not anchor.in_published:
            print("  * held out: not in published.json (DeepSeek's prefill profile as LMSYS read"
                  " it, 2025-05-05); the catalog's constants were fitted without it")
    print(f"worst error over the capacity figures {worst_capacity:.1%} (target {TOLERANCE:.0%});"
          f" the day average {'bounds' if bounded else 'EXCEEDS'} the simulated capacity from"
          f" below; worst over every row {worst_all:.1%}; {time.perf_counter() - start:.1f} s")
    return 0 if worst_capacity <= TOLERANCE and bounded else 1


if __name__ == "__main__":
    sys.exit(main())
