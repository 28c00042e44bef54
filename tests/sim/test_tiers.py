"""KV tiers in the simulator: hit fractions, load costs, catalog paths, sizing, flags."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from tessera.sim import Deployment, Scenario, SimError, Workload, simulate
from tessera.sim import simulator as simulator_mod
from tessera.sim.cli import plan_main, sim_main
from tessera.sim.hardware import System, get_system
from tessera.sim.kvsizing import model_kv_bytes_per_token
from tessera.sim.model import load_model
from tessera.sim.tiers import KVTiers, TierLink, tier_load_s, tier_sizing
from tessera.sim.workload import generate

COLOCATED = Deployment(mode="colocated", precision="fp8", num_dp=1, tp=8, batch_per_dp=8)
PD = Deployment(mode="pd", precision="fp8", num_dp=16, batch_per_dp=32, num_prefill_devices=16,
                prefill_instance_devices=16)


def _wl(**hits: float) -> Workload:
    # One request at a time: TTFT is the prefill itself, no queueing.
    return Workload(num_requests=6, input_tokens=8000, output_tokens=4, concurrency=1, **hits)


def _ttft_ms(dep: Deployment, model: str, **hits: float) -> float:
    return simulate(Scenario("dgx-h100", model, dep, _wl(**hits))).ttft_ms_mean


@pytest.mark.parametrize("kw, needle", [
    ({"host_hit_fraction": 1.0}, "--host-hit must be below 1"),
    ({"ssd_hit_fraction": -0.1}, "--ssd-hit must be at least 0"),
    ({"remote_hit_fraction": float("nan")}, "--remote-hit must be a finite number"),
    ({"host_hit_fraction": "0.2"}, "--host-hit must be a number"),
    ({"prefix_hit_fraction": 0.5, "host_hit_fraction": 0.3, "ssd_hit_fraction": 0.2},
     "must be below 1 (got 1)"),
    ({"num_sessions": 0}, "--sessions must be at least 1"),
])
def test_bad_tier_inputs_are_one_line_errors(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(SimError, match=None) as exc:
        Workload(num_requests=1, input_tokens=10, output_tokens=1, concurrency=1,
                 **kw).validate()  # type: ignore[arg-type]
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_zero_fractions_change_nothing() -> None:
    base = Workload(num_requests=80, input_tokens=1500, output_tokens=40, request_rate_per_s=30,
                    length_cv=0.5, prefix_hit_fraction=0.4)
    zeros = replace(base, host_hit_fraction=0.0, ssd_hit_fraction=0.0, remote_hit_fraction=0.0)
    for dep in (COLOCATED, PD):
        model = "llama-3-70b" if dep is COLOCATED else "deepseek-v3"
        a = simulate(Scenario("dgx-h100", model, dep, base)).to_dict()
        b = simulate(Scenario("dgx-h100", model, dep, zeros)).to_dict()
        assert a == b
        assert a["host_tier_bytes_per_node"] == a["tier_nodes"] == 0
    assert generate(base).tier_tokens is None


def test_tier_tokens_split_the_hit_share() -> None:
    wl = Workload(num_requests=50, input_tokens=777, output_tokens=4, concurrency=1,
                  length_cv=0.8, prefix_hit_fraction=0.2, host_hit_fraction=0.3,
                  ssd_hit_fraction=0.1, remote_hit_fraction=0.05)
    reqs = generate(wl, seed=3)
    alone = generate(replace(wl, host_hit_fraction=0.0, ssd_hit_fraction=0.0,
                             remote_hit_fraction=0.0), seed=3)
    assert reqs.tier_tokens is not None and reqs.tier_tokens.shape == (50, 3)
    device = reqs.cached_tokens - reqs.tier_tokens.sum(axis=1)
    assert np.array_equal(device, alone.cached_tokens)  # the device's share is unchanged
    assert np.array_equal(reqs.cached_tokens, np.floor(reqs.input_tokens * 0.65))
    assert (reqs.tier_tokens >= 0).all() and (reqs.cached_tokens < reqs.input_tokens).all()


@pytest.mark.parametrize("dep, model", [(COLOCATED, "llama-3-70b"), (PD, "deepseek-v3")])
def test_a_tier_hit_beats_recompute_but_not_a_device_hit(dep: Deployment, model: str) -> None:
    recompute = _ttft_ms(dep, model)
    device = _ttft_ms(dep, model, prefix_hit_fraction=0.6)
    host = _ttft_ms(dep, model, host_hit_fraction=0.6)
    ssd = _ttft_ms(dep, model, ssd_hit_fraction=0.6)
    assert device < host < ssd < recompute


def test_a_slow_tier_costs_more_than_it_saves(monkeypatch: pytest.MonkeyPatch) -> None:
    catalog_ssd = _ttft_ms(COLOCATED, "llama-3-70b", ssd_hit_fraction=0.6)
    recompute = _ttft_ms(COLOCATED, "llama-3-70b")
    system = get_system("dgx-h100")
    slow = replace(system.tiers(), ssd=TierLink(device_bytes_per_s=64e9, node_bytes_per_s=1e9))

    def slow_system(name: str, num_systems: int = 1) -> System:
        return replace(system, kv_tiers=slow)

    monkeypatch.setattr(simulator_mod, "get_system", slow_system)
    slow_ssd = _ttft_ms(COLOCATED, "llama-3-70b", ssd_hit_fraction=0.6)
    # 4800 tokens x 320 KiB / 8 devices at 1/8 GB/s each: about 1.6 s of loading.
    assert slow_ssd > recompute > catalog_ssd


def test_load_paths_take_the_device_link_or_the_node_share() -> None:
    tiers = get_system("dgx-h100").tiers()
    assert tiers.devices_per_node == 8
    assert tiers.load_bytes_per_s("host") == 64e9  # PCIe Gen5 x16; 614 GB/s of DRAM / 8 is more
    assert tiers.load_bytes_per_s("ssd") == 7e9  # eight ~7 GB/s drives shared by eight GPUs
    assert tiers.load_bytes_per_s("remote") == 50e9  # one 400 Gb/s NIC per GPU
    cm = get_system("cloudmatrix384").tiers()
    assert cm.devices_per_node == 16 and cm.load_bytes_per_s("host") == 40e9  # 4 x 160 / 16 dies
    for name in ("gb200-nvl72", "dgx-b200", "dgx-h800", "dgx-h200", "cpu-local"):
        t = get_system(name).tiers()
        assert all(t.load_bytes_per_s(x) > 0 for x in ("host", "ssd", "remote"))
    one = KVTiers(devices_per_node=2, host=TierLink(10e9, 8e9), ssd=TierLink(1e9, 1e9),
                  remote=TierLink(2e9, 100e9))
    # 1000 host tokens at 4 GB/s, 500 SSD ones at 0.5 GB/s, 0 remote; 1 kB a token
    assert tier_load_s(np.array([1000, 500, 0]), 1000.0, one) == pytest.approx(2.5e-4 + 1e-3)


def test_sizing_arithmetic() -> None:
    s = tier_sizing(num_sessions=100, prompt_tokens=2000, kv_bytes_per_token=1e5,
                    fractions={"host": 0.3, "ssd": 0.2, "remote": 0.1}, num_loading_devices=20,
                    devices_per_node=8)
    assert s.num_nodes == 3
    assert s.host_bytes_per_node == pytest.approx(100 * 2000 * 1e5 * 0.3 / 3)
    # The SSD tier is written through from the host tier: it keeps both shares.
    assert s.ssd_bytes_per_node == pytest.approx(100 * 2000 * 1e5 * 0.5 / 3)
    assert s.remote_bytes == pytest.approx(100 * 2000 * 1e5 * 0.1)
    no_ssd = tier_sizing(100, 2000, 1e5, {"host": 0.3, "ssd": 0.0, "remote": 0.0}, 8, 8)
    assert no_ssd.ssd_bytes_per_node == 0 and no_ssd.num_nodes == 1


def test_simulated_sizing_follows_the_sessions_and_the_prefill_pool() -> None:
    wl = Workload(num_requests=40, input_tokens=3000, output_tokens=8, concurrency=20,
                  host_hit_fraction=0.5, ssd_hit_fraction=0.25)
    kvb = model_kv_bytes_per_token(load_model("deepseek-v3"))
    res = simulate(Scenario("dgx-h100", "deepseek-v3", PD, wl))
    assert res.tier_sessions == 20 and res.tier_nodes == 2  # 16 prefill GPUs, 8 per node
    assert res.host_tier_bytes_per_node == pytest.approx(20 * 3000 * 0.5 * kvb / 2)
    assert res.ssd_tier_bytes_per_node == pytest.approx(20 * 3000 * 0.75 * kvb / 2)
    many = simulate(Scenario("dgx-h100", "deepseek-v3", PD, replace(wl, num_sessions=5000)))
    assert many.host_tier_bytes_per_node == pytest.approx(5000 * 3000 * 0.5 * kvb / 2)
    assert many.ttft_ms_mean == res.ttft_ms_mean  # sizing does not change the run


def test_planner_scores_tier_hits() -> None:
    from tessera.sim.planner import plan

    kw = {"num_chips": 16, "tpot_slo_ms": 60.0, "ttft_slo_ms": None, "input_tokens": 4000,
          "output_tokens": 100, "top": 1, "verify": 0}
    _, plain = plan("dgx-h100", "llama-3-70b", **kw)  # type: ignore[arg-type]
    hits = Workload(num_requests=1, input_tokens=4000, output_tokens=100, concurrency=1,
                    host_hit_fraction=0.5)
    _, tiered = plan("dgx-h100", "llama-3-70b", hits=hits, **kw)  # type: ignore[arg-type]
    assert max(c.tokens_per_s_per_chip for c in tiered) > max(
        c.tokens_per_s_per_chip for c in plain)


def test_sim_flags_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--hardware", "dgx-h100", "--model", "deepseek-v3", "--precision", "fp8",
            "--deployment", "pd", "--decode-devices", "16", "--prefill-devices", "16",
            "--batch-per-dp", "8", "--input-tokens", "2000", "--output-tokens", "10",
            "--num-requests", "40", "--concurrency", "16", "--host-hit", "0.3"]
    assert sim_main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tier_sessions"] == 16 and data["tier_nodes"] == 2
    assert data["host_tier_bytes_per_node"] > 0 and data["ssd_tier_bytes_per_node"] == 0
    assert sim_main([*argv, "--ssd-hit", "0.2", "--sessions", "1000"]) == 0
    text = capsys.readouterr().out
    assert "ssd_tier_bytes_per_node" in text and "tier_sessions" in text
    assert sim_main([*argv, "--remote-hit", "0.7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tessera sim: error: --prefix-hit + --host-hit") and "\n" not in err


def test_cpu_local_refuses_tier_hits(capsys: pytest.CaptureFixture[str]) -> None:
    assert sim_main(["--hardware", "cpu-local", "--model", "qwen2.5-0.5b", "--batch-per-dp", "2",
                     "--input-tokens", "16", "--output-tokens", "4", "--host-hit", "0.5"]) == 2
    assert "not simulated on the engine scheduler's path" in capsys.readouterr().err


def test_plan_flags_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--hardware", "dgx-h100", "--model", "llama-3-70b", "--chips", "16",
            "--tpot-slo-ms", "60", "--input-tokens", "1500", "--output-tokens", "100",
            "--top", "1", "--host-hit", "0.4", "--ssd-hit", "0.2", "--sessions", "2000"]
    assert plan_main(argv) == 0
    out = capsys.readouterr().out
    assert "kv tiers: 2000 sessions" in out and "host DRAM" in out and "SSD" in out
    assert plan_main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    best = data["best"][0]
    assert data["num_feasible"] > 0 and best["estimate"]["tokens_per_s_per_chip"] > 0
    assert best["simulated"]["tier_sessions"] == 2000
    assert best["simulated"]["ssd_tier_bytes_per_node"] > best["simulated"][
        "host_tier_bytes_per_node"] > 0
    assert plan_main([*argv, "--remote-hit", "0.5"]) == 2
    assert "must be below 1" in capsys.readouterr().err
