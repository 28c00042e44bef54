"""``python -m tessera.demo_model`` prints the bundled model's directory (for ``tessera generate``)."""

from tessera.demo_model import model_dir

print(model_dir())
