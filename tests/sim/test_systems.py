"""Deployments that span several systems (``--systems N``): pools fill the systems in order,
KV handoffs that leave a system take the scale-out network, and the planner searches the
joined devices."""

from __future__ import annotations

import pytest

from tessera import deployment_file as df
from tessera.sim.cli import plan_main, sim_main
from tessera.sim.deployment import Deployment, kv_handoff_cost
from tessera.sim.errors import SimError
from tessera.sim.hardware import get_system
from tessera.sim.model import load_model


def _pd(decode: int, prefill: int) -> Deployment:
    return Deployment(mode="pd", precision="int8", num_dp=decode, batch_per_dp=32,
                      num_prefill_devices=prefill, prefill_instance_devices=32)


def test_handoff_share_follows_placement() -> None:
    assert _pd(768, 768).handoffs_across_systems(768) == 1.0  # prefill on the second system
    assert _pd(512, 256).handoffs_across_systems(768) == 0.0  # both in the first
    assert _pd(640, 256).handoffs_across_systems(768) == pytest.approx(1 - 128 / 256)
    assert Deployment(mode="colocated", num_dp=8).handoffs_across_systems(4) == 0.0


def test_two_supernodes_join_over_their_rdma_plane() -> None:
    one, two = get_system("cloudmatrix384"), get_system("cloudmatrix384", 2)
    assert two.num_devices == 2 * one.num_devices and two.num_systems == 2
    assert one.scale_out is None and two.scale_out is not None
    assert two.scale_out.name == "cloudmatrix-rdma"
    assert two.num_devices_per_system == one.num_devices
    # Systems with a scale-out network of their own keep it between systems.
    assert get_system("dgx-h100", 2).scale_out == get_system("dgx-h100").scale_out
    model = load_model("deepseek-v3")
    within, _ = kv_handoff_cost(two, model, _pd(512, 256))
    across, latency = kv_handoff_cost(two, model, _pd(768, 768))
    assert within == kv_handoff_cost(one, model, _pd(512, 256))[0]
    ratio = two.scale_up.bytes_per_s / two.scale_out.bytes_per_s
    assert across / within == pytest.approx(ratio)
    assert latency == pytest.approx(two.scale_out.latency_us * 1e-6)


def test_a_prefill_supernode_feeding_a_decode_supernode_is_simulated(
        capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--model", "deepseek-v3", "--precision", "int8", "--deployment", "pd",
              "--batch-per-dp", "32", "--input-tokens", "4096", "--output-tokens", "256",
              "--concurrency", "4000", "--num-requests", "4000", "--json"]
    import json

    assert sim_main(["--hardware", "cloudmatrix384", "--systems", "2", "--decode-devices",
                     "768", "--prefill-devices", "768", *common]) == 0
    two = json.loads(capsys.readouterr().out)
    assert two["devices"] == 1536 and two["num_finished"] == 4000
    # The same pools inside one system (of twice the size, all on its unified bus) hand off
    # faster: the difference is the RDMA plane.
    assert sim_main(["--hardware", "cloudmatrix384", "--decode-devices", "512",
                     "--prefill-devices", "256", *common]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["ttft_ms_p50"] > 0 and two["ttft_ms_p50"] > 0


def test_plan_searches_the_joined_systems(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    out = tmp_path / "plan.json"
    rc = plan_main(["--hardware", "gb200-nvl72", "--systems", "2", "--model", "deepseek-v3",
                    "--chips", "144", "--tpot-slo-ms", "60", "--input-tokens", "1000",
                    "--output-tokens", "200", "--top", "1", "--emit-deployment", str(out)])
    assert rc == 0, capsys.readouterr().err
    dep = df.read(out)
    assert dep.num_systems == 2 and dep.num_devices > 72
    with pytest.raises(df.DeploymentError, match="spans 2 systems"):
        df.engine_options(dep)
    assert plan_main(["--hardware", "gb200-nvl72", "--systems", "2", "--model", "deepseek-v3",
                      "--chips", "145", "--tpot-slo-ms", "60", "--input-tokens", "1",
                      "--output-tokens", "1"]) == 2
    assert "--chips" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "num", "needle"), [
    ("cpu-local", 2, "this one machine"),
    ("cloudmatrix384", 0, "--systems must be an integer"),
    ("cloudmatrix384", 65, "--systems must be an integer"),
])
def test_bad_system_counts(name: str, num: int, needle: str) -> None:
    with pytest.raises(SimError, match=needle):
        get_system(name, num)
