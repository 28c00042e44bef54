"""The bundled demo model: a ~2M-parameter Llama trained to add numbers and copy or reverse
strings in chat (``tessera.demo_model.train`` made it; the weights ship in ``weights/``)."""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "weights"
SERVED_NAME = "tessera-demo"


def model_dir() -> Path:
    """The bundled model directory; a clear error if the package was installed without it."""
    if not (MODEL_DIR / "config.json").is_file() or not (MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the demo model's files are missing from {MODEL_DIR} "
            "(reinstall tessera, or run python -m tessera.demo_model.train)"
        )
    return MODEL_DIR
