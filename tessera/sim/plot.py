"""Throughput-latency frontier plots (matplotlib, Agg backend)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .planner import Candidate


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pareto frontier of (tpot_ms, tokens/s): best throughput at or below each latency."""
    out: list[tuple[float, float]] = []
    best = -1.0
    for tpot, tps in sorted(points):
        if tps > best:
            out.append((tpot, tps))
            best = tps
    return out


def plot_frontier(series: dict[str, list[Candidate]], path: str, title: str,
                  tpot_slo_ms: float | None = None) -> None:
    """Plot the frontier of each (label, mode) pair to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"colocated": ":", "pd": "--", "afd": "-"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, cands) in enumerate(series.items()):
        for mode in ("colocated", "pd", "afd"):
            pts = [(c.tpot_ms, c.tokens_per_s_per_chip) for c in cands
                   if c.deployment.mode == mode]
            front = frontier(pts)
            if front:
                xs, ys = zip(*front, strict=True)
                ax.plot(xs, ys, marker="o", ms=3, ls=styles[mode], color=colors[i % len(colors)],
                        label=f"{label} {mode}")
    if tpot_slo_ms:
        ax.axvline(tpot_slo_ms, color="grey", ls="--", lw=1, label="TPOT SLO")
    ax.set_xlabel("TPOT (ms)")
    ax.set_xlim(0, 5 * tpot_slo_ms if tpot_slo_ms else None)
    ax.set_ylabel("output tokens/s per chip")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
