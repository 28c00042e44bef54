"""Throughput-latency frontier plots (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SimError
from .inputs import check_output_file, require_module

if TYPE_CHECKING:
    from .planner import Candidate


def check_plot_file(path: str) -> None:
    """Raise :class:`SimError` unless a plot can be written to ``path``: matplotlib is
    installed, the directory exists and is writable, and matplotlib knows the file type."""
    require_module("matplotlib", "--plot", "sim")
    check_output_file(path, "--plot")
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix:  # no suffix: matplotlib writes PNG
        from matplotlib.backend_bases import FigureCanvasBase

        known = FigureCanvasBase.get_supported_filetypes()
        if suffix not in known:
            raise SimError(f"--plot {path}: matplotlib cannot write .{suffix} files (use one of"
                           f" {', '.join(sorted(known))})")


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
    """Plot the frontier of each (label, mode) pair to ``path`` (see :func:`check_plot_file`)."""
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
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:  # checked up front, but the disk can fill or the directory go
        raise SimError(f"cannot write --plot {path}: {exc.strerror or exc}") from exc
    finally:
        plt.close(fig)
