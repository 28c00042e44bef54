"""Print published vs simulated figures for every result in published.json.

The mapping from each anchor's text to a scenario is documented in
:mod:`tessera.sim.validation`. Exit status is 1 when any error exceeds 15%. An anchor that
averages a day of varying load also gets a line with the average utilization it implies, and a
decode figure published with a TPOT a line comparing it with the simulated mean TPOT.
"""

from __future__ import annotations

import sys
import time

from tessera.sim.validation import anchors, best_result, nodes_in_service_check

TOLERANCE = 0.15


def main() -> int:
    """Run every anchor and print the table."""
    print(f"{'anchor':<36} {'metric':<30} {'published':>10} {'simulated':>10} {'error':>8}")
    worst = 0.0
    start = time.perf_counter()
    for anchor in anchors():
        result = best_result(anchor)
        sim = float(getattr(result, anchor.metric))
        err = (sim - anchor.published) / anchor.published
        worst = max(worst, abs(err))
        print(f"{anchor.anchor_id:<36} {anchor.metric:<30} {anchor.published:>10.0f}"
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
                  f" {anchor.published / sim:.0%} average utilization")
    print(f"worst error {worst:.1%} (target {TOLERANCE:.0%}); {time.perf_counter() - start:.1f} s")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
