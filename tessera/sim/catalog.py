"""Data files shipped with the simulator: hardware catalog, model configs, published anchors.

The published anchors file is looked for first in ``shared/anchors/published.json`` next to the
repository root (a live copy maintained alongside the project), then in the bundled copy.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from .errors import SimError

DATA_DIR = Path(__file__).resolve().parent / "data"
REPO_ROOT = Path(__file__).resolve().parents[2]


def published_path() -> Path:
    """Return the published-anchors JSON to use: the shared one if present, else the bundled one."""
    shared = REPO_ROOT.parent / "shared" / "anchors" / "published.json"
    return shared if shared.is_file() else DATA_DIR / "published.json"


@cache
def load_published() -> dict[str, Any]:
    """Parsed published anchors (hardware, systems, results, transformerless design)."""
    with published_path().open() as f:
        data: dict[str, Any] = json.load(f)
    return data


@cache
def load_hardware() -> dict[str, Any]:
    """Parsed bundled hardware catalog (chips, efficiency sets, fabrics, systems)."""
    with (DATA_DIR / "hardware.json").open() as f:
        data: dict[str, Any] = json.load(f)
    return data


def bundled_model_names() -> list[str]:
    """Names of the model configs bundled as JSON."""
    return sorted(p.stem for p in (DATA_DIR / "models").glob("*.json"))


def load_model_config(name_or_path: str) -> dict[str, Any]:
    """Load an HF-style config: a bundled name, a config.json path, or a model directory."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        bundled = DATA_DIR / "models" / f"{name_or_path}.json"
        if not bundled.is_file():
            names = ", ".join(bundled_model_names())
            raise SimError(f"unknown model {name_or_path!r}: give a config.json path or one of {names}")
        path = bundled
    try:
        with path.open() as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise SimError(f"cannot read model config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise SimError(f"model config {path} is not a JSON object")
    return data
