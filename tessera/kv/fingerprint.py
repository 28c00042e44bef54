"""The identity of a KV cache layout: which model, dtype and block shape KV bytes belong
to. Pure Python (no torch).

Blocks are only exchanged between engines with equal fingerprints. It covers the model's
config and a sample of its weight files (two checkpoints of one architecture have equal
configs but different KV), the KV dtype, the block size and the per-layer block shape.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_SAMPLE_BYTES = 1 << 16
FORMAT_VERSION = 1


def layout_fingerprint(model_dir: str | Path, kv_dtype: str, block_shape: tuple[int, ...],
                       num_layers: int) -> str:
    """A 32-hex-digit name of this model's KV layout. Reads the config and the first and
    last 64 KiB of each weight file."""
    root = Path(model_dir)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"tessera-kv-v{FORMAT_VERSION}|{kv_dtype}|{block_shape}|{num_layers}".encode())
    config = root / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for path in sorted(root.glob("*.safetensors")):
        size = path.stat().st_size
        h.update(f"|{path.name}|{size}|".encode())
        with path.open("rb") as f:
            h.update(f.read(_SAMPLE_BYTES))
            f.seek(max(0, size - _SAMPLE_BYTES))
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()
