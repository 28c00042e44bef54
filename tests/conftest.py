from __future__ import annotations

import pytest
import torch

from tests.models import build_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """Build each random model once per test session: name -> (dir, HF reference model)."""
    cache: dict = {}

    def get(name: str, **overrides):
        key = (name, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(name)
            cache[key] = build_model(name, out, **overrides)
        return cache[key]

    return get
