"""Choose a catalog chip family's efficiency constants from its published anchors.

The catalog's constants per chip family (``hardware.json``: ``efficiency``) are fitted, not
measured: a coarse grid over the fractions of peak and the fixed costs, keeping the point whose
worst anchor error is smallest. This module runs that search so that the catalog's values can be
checked and a new family fitted. Anchors that average a day of varying load
(:attr:`Anchor.time_average`) bound capacity from below and are not fitted on, nor are the
held-out figures validation adds from outside ``published.json``; the search still reports their
error at each point, and the best worst-error reachable if the day averages were fitted on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from tessera.sim.catalog import load_hardware
from tessera.sim.errors import SimError
from tessera.sim.validation import Anchor, anchors, run_anchor

SEARCHED = ("matmul", "attention", "fabric", "step_overhead_ms")
"""Constants the catalog's grid searches vary; ``memory`` is fixed at 0.8 of peak bandwidth and
the per-op costs are left alone (the anchors are whole-system rates that barely see them)."""


@dataclass(frozen=True)
class GridPoint:
    """One set of constants and each anchor's relative error (simulated / published - 1)."""

    values: tuple[tuple[str, float], ...]
    errors: tuple[tuple[str, float], ...]

    def worst(self, fitted: Sequence[str]) -> float:
        """Largest absolute error over the anchors in ``fitted``."""
        return max(abs(e) for a, e in self.errors if a in fitted)


def family_of(anchor: Anchor) -> str:
    """The efficiency family of the chip the anchor's scenarios run on."""
    hw = load_hardware()
    chip = hw["systems"][anchor.scenarios[0].hardware]["chip"]
    return str(hw["chips"][chip]["efficiency"])


def family_anchors(family: str, anchor_ids: Sequence[str] | None = None) -> list[Anchor]:
    """The anchors whose scenarios run on ``family``'s chips (optionally only ``anchor_ids``)."""
    if family not in load_hardware()["efficiency"]:
        raise SimError(f"unknown efficiency family {family!r}")
    found = [a for a in anchors() if family_of(a) == family
             and (anchor_ids is None or a.anchor_id in anchor_ids)]
    if not found:
        raise SimError(f"no published anchor runs on the {family!r} family")
    return found


@contextmanager
def efficiency_override(family: str, values: Mapping[str, float]) -> Iterator[None]:
    """Run the block with ``family``'s catalog constants replaced by ``values``.

    The catalog is parsed once per process and every system is built from it on demand, so
    patching the parsed copy reaches every scenario; the old values come back on exit.
    """
    block = load_hardware()["efficiency"][family]
    unknown = set(values) - set(block)
    if unknown:
        raise SimError(f"not constants of {family!r}: {', '.join(sorted(unknown))}")
    saved = {k: block[k] for k in values}
    block.update(values)
    try:
        yield
    finally:
        block.update(saved)


def evaluate(family: str, values: Mapping[str, float], chosen: Sequence[Anchor]) -> GridPoint:
    """Every anchor in ``chosen`` simulated with ``family``'s constants set to ``values``."""
    with efficiency_override(family, values):
        errors = tuple((a.anchor_id, run_anchor(a) / a.published - 1.0) for a in chosen)
    return GridPoint(values=tuple(sorted(values.items())), errors=errors)


def fitted_ids(chosen: Sequence[Anchor]) -> list[str]:
    """Anchors a fit minimises over: those of ``published.json`` that are capacities. Day
    averages bound capacity from below; the figures validation adds from other sources
    (:attr:`Anchor.in_published`) are held out, so that they stay a check the fit never saw."""
    return [a.anchor_id for a in chosen if not a.time_average and a.in_published]


def catalog_values(family: str) -> dict[str, float]:
    """The catalog's current values of the searched constants."""
    block = load_hardware()["efficiency"][family]
    return {k: float(block[k]) for k in SEARCHED}
