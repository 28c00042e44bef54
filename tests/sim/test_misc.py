"""Imbalance model and batching."""

import numpy as np
import pytest

from tessera.sim.batching import DecodeSlots
from tessera.sim.moe import rank_imbalance


def test_imbalance() -> None:
    assert rank_imbalance(256, 1, 1000, True) == 1.0
    assert rank_imbalance(256, 256, 1e6, False) == pytest.approx(30.0, rel=0.01)
    assert 1.0 < rank_imbalance(256, 32, 1e6, True) < 1.3
    assert rank_imbalance(256, 32, 100, True) > rank_imbalance(256, 32, 1e6, True)


def test_slots_balance_and_conserve() -> None:
    s = DecodeSlots(2, 2, 100)
    assert [s.admit(i, 10, 3) for i in range(4)] == [0, 1, 0, 1]
    assert s.admit(9, 10, 3) == -1
    finished, emitted = s.advance(np.full((2, 2), 2.0))
    assert finished.size == 0 and emitted == 8
    finished, emitted = s.advance(np.full((2, 2), 2.0))
    assert sorted(finished.tolist()) == [0, 1, 2, 3] and emitted == 4
    assert s.total_active == 0 and s.reserved.sum() == 0
