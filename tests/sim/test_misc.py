"""Imbalance model, batching, and where host costs come from."""

from pathlib import Path

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


def test_host_costs_come_from_a_calibrated_profile_only() -> None:
    from tessera.sim.hardware import (
        HostCosts,
        get_system,
        local_system,
        system_from_profile,
    )

    assert get_system("dgx-h100").host == HostCosts()  # catalog chips: chip facts only
    assert local_system(Path("/nonexistent/cpu-local.json")).host == HostCosts()  # the example
    base = {"tflops": {"fp32": 0.1}, "memory_gb": 16, "memory_gb_s": 10,
            "efficiency": {"matmul": 0.5, "attention": 0.2, "memory": 0.8, "fabric": 1.0,
                           "op_overhead_us": 2.0, "ops_per_layer": 14, "step_overhead_ms": 0.5}}
    host = {"seq_overhead_us": 20.0, "attention_row_us": 1.5, "native_decode_rows": 3,
            "kv_whole_batch": 16, "kv_memory_split": 0.3}
    split = system_from_profile({**base, "host": host})
    assert split.host == HostCosts(20.0, 1.5, 3, 16, 0.3)
    # A profile written before host costs had their own block kept them among the efficiencies.
    legacy = system_from_profile({**base, "efficiency": {**base["efficiency"], **host}})
    assert legacy == split
    with pytest.raises(ValueError, match="unknown host costs"):
        system_from_profile({**base, "host": {"warp_speed": 1.0}})
