"""CLI: --json keys, one-line errors with non-zero status, plan output."""

import json

import pytest

from tessera.sim.cli import plan_main, sim_main

BASE = ["--model", "qwen3-235b-a22b", "--precision", "fp8", "--input-tokens", "200",
        "--output-tokens", "20", "--num-requests", "60"]


def test_json_keys(capsys: pytest.CaptureFixture[str]) -> None:
    rc = sim_main(["--hardware", "dgx-h200", "--deployment", "pd", "--decode-devices", "8",
                   "--prefill-devices", "8", "--batch-per-dp", "8", "--json", *BASE])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("decode_tokens_per_s_per_chip", "prefill_tokens_per_s_per_chip", "tpot_ms_mean",
                "tpot_ms_p99", "ttft_ms_mean", "ttft_ms_p99", "chips"):
        assert key in data
    assert data["chips"] == 16 and data["num_finished"] == 60


@pytest.mark.parametrize("argv, needle", [
    (["--hardware", "nope", "--dp", "8"], "unknown hardware"),
    (["--hardware", "gb200-nvl72", "--dp", "100"], "has 72"),
    (["--hardware", "dgx-h100", "--dp", "2"], "does not fit"),
    (["--hardware", "dgx-h200", "--dp", "8", "--batch-per-dp", "0"], "at least 1"),
    (["--hardware", "dgx-h200", "--dp", "8", "--mtp-acceptance", "2"], "mtp"),
    (["--hardware", "dgx-h200", "--dp", "8", "--request-rate", "-1"], "request-rate"),
    (["--hardware", "dgx-h200", "--dp", "8", "--precision", "fp4"], "precision"),
])
def test_bad_scenarios_give_one_line_errors(argv: list[str], needle: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    args = [*BASE, *argv]
    rc = sim_main(args)
    err = capsys.readouterr().err
    assert rc != 0
    assert err.count("\n") == 1 and needle.lower() in err.lower()
    assert "Traceback" not in err


def test_ascend_has_no_fp8(capsys: pytest.CaptureFixture[str]) -> None:
    rc = sim_main(["--hardware", "cloudmatrix384", "--model", "deepseek-v3", "--precision", "fp8",
                   "--input-tokens", "10", "--output-tokens", "10"])
    assert rc == 2 and "no fp8" in capsys.readouterr().err


def test_plan_prints_best(capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    png = f"{tmp_path}/f.png"
    rc = plan_main(["--hardware", "gb200-nvl72", "--model", "deepseek-v3", "--chips", "72",
                    "--tpot-slo-ms", "60", "--input-tokens", "1000", "--output-tokens", "200",
                    "--plot", png])
    out = capsys.readouterr().out
    assert rc == 0 and "tok/s/chip" in out
    with open(png, "rb") as f:
        assert f.read(4) == b"\x89PNG"
    assert plan_main(["--hardware", "gb200-nvl72", "--model", "deepseek-v3", "--chips", "999",
                      "--tpot-slo-ms", "60", "--input-tokens", "1", "--output-tokens", "1"]) == 2


@pytest.mark.parametrize("argv, needle", [
    (["--seed", "-1"], "seed"),
    (["--num-requests", "0"], "requests"),
    (["--request-rate", "inf"], "finite"),
    (["--tp", "0"], "tp"),
])
def test_more_bad_numbers(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = sim_main(["--hardware", "dgx-h200", "--dp", "8", *BASE, *argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1


def test_malformed_config_file(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    path = f"{tmp_path}/config.json"
    with open(path, "w") as f:
        f.write("{not json")
    rc = sim_main(["--hardware", "dgx-h200", "--model", path, "--input-tokens", "10",
                   "--output-tokens", "10"])
    assert rc == 2 and "cannot read model config" in capsys.readouterr().err


def test_cpu_local_runs_the_engine_scheduler(capsys: pytest.CaptureFixture[str],
                                             tmp_path: object,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    profile = Path(str(tmp_path)) / "cpu-local.json"
    profile.write_text(json.dumps({
        "tflops": {"fp32": 0.1, "bf16": 1.0}, "memory_gb": 16, "memory_gb_s": 10,
        "efficiency": {"matmul": 0.5, "attention": 0.2, "memory": 0.8, "fabric": 1.0,
                       "op_overhead_us": 2.0, "ops_per_layer": 14, "step_overhead_ms": 0.5},
        "host": {"seq_overhead_us": 20.0}}))
    monkeypatch.setenv("TESSERA_SIM_PROFILE", str(profile))
    rc = sim_main(["--hardware", "cpu-local", "--model", "qwen2.5-0.5b", "--precision", "fp32",
                   "--batch-per-dp", "4", "--input-tokens", "64", "--output-tokens", "16",
                   "--concurrency", "4", "--num-requests", "12", "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "colocated (engine scheduler)"
    assert data["num_finished"] == 12 and data["mean_decode_batch_per_dp"] <= 4
    assert data["tpot_ms_mean"] > 0 and data["decode_tokens_per_s_per_chip"] > 0


@pytest.mark.slow
def test_calibrate_on_a_model_too_short_for_its_workloads(
        tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    from tessera.demo_model import model_dir

    out = f"{tmp_path}/profile.json"
    rc = sim_main(["calibrate", "--model", str(model_dir()), "--out", out])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "holds 256 tokens of context" in err and "need 3002" in err
    import os

    assert not os.path.exists(out)  # nothing half-written
