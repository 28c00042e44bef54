"""Hostile inputs to ``tessera sim``, ``tessera plan``, ``tessera sim calibrate`` and the API.

Each must end with status 2 and one stderr line (or a SimError), before any simulation, search
or measurement starts: the work functions are replaced by ones that fail the test if reached,
and each call must also return well within the time a search takes.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tessera.sim import Deployment, Scenario, SimError, Workload
from tessera.sim import calibrate as calibrate_mod
from tessera.sim import cli as cli_mod
from tessera.sim import planner as planner_mod
from tessera.sim.cli import plan_main, sim_main

# A plan of cloudmatrix384 x384 searches for about 10 s on one idle core; a rejected input
# returns in milliseconds. The bound leaves room for a loaded machine and still tells them apart.
FAST_S = 3.0

SIM = ["--hardware", "dgx-h200", "--model", "qwen3-235b-a22b", "--precision", "fp8",
       "--dp", "8", "--input-tokens", "200", "--output-tokens", "20"]
PLAN = ["--hardware", "cloudmatrix384", "--model", "deepseek-v3", "--chips", "384",
        "--tpot-slo-ms", "50", "--input-tokens", "2000", "--output-tokens", "500"]

SIM_CASES = [
    *[[flag, bad] for flag in ("--dp", "--ep", "--tp", "--batch-per-dp", "--micro-batches",
                               "--ffn-devices", "--prefill-devices", "--decode-devices",
                               "--prefill-instance-devices", "--input-tokens",
                               "--output-tokens", "--kv-tokens", "--concurrency",
                               "--num-requests") for bad in ("0", "-4")],
    ["--attention-devices", "0"], ["--redundant-experts", "-1"], ["--seed", "-1"],
    ["--dp", "2.5"], ["--num-requests", "1e3"], ["--num-requests", "999999999999"],
    ["--batch-per-dp", "100000000"],
    *[[flag, bad] for flag in ("--request-rate", "--length-cv", "--prefix-hit",
                               "--mtp-acceptance") for bad in ("nan", "inf", "-1")],
    ["--request-rate", "0"], ["--prefix-hit", "1"], ["--mtp-acceptance", "1.5"],
    *[[flag, bad] for flag in ("--host-hit", "--ssd-hit", "--remote-hit") for bad in ("nan", "-1", "1")],
    ["--prefix-hit", "0.5", "--ssd-hit", "0.5"], ["--sessions", "0"],
    ["--hardware", "no-such-system"], ["--model", "no-such-model"],
    ["--precision", "fp4"], ["--deployment", "afd"],
]

PLAN_CASES = [
    ["--chips", "0"], ["--chips", "-1"], ["--chips", "385"], ["--chips", "many"],
    ["--tpot-slo-ms", "0"], ["--tpot-slo-ms", "-5"], ["--tpot-slo-ms", "nan"],
    ["--tpot-slo-ms", "inf"], ["--ttft-slo-ms", "0"], ["--ttft-slo-ms", "nan"],
    ["--input-tokens", "0"], ["--output-tokens", "-1"], ["--top", "0"],
    ["--mtp-acceptance", "nan"], ["--mtp-acceptance", "2"],
    ["--host-hit", "1"], ["--remote-hit", "inf"], ["--sessions", "-3"],
    ["--host-hit", "0.6", "--ssd-hit", "0.2", "--remote-hit", "0.2"],
    ["--hardware", "no-such-system"], ["--model", "no-such-model"], ["--precision", "fp8"],
    ["--plot", "/no/such/dir/frontier.png"], ["--plot", "."], ["--plot", "frontier.nosuchtype"],
    ["--plot", "f.png", "--compare", "gb200-nvl72"], ["--plot", "f.png", "--compare", "x:4"],
    ["--plot", "f.png", "--compare", "gb200-nvl72:0"],
    ["--plot", "f.png", "--compare", "gb200-nvl72:999"], ["--compare", "gb200-nvl72:72"],
]

CALIBRATE_CASES = [
    ["--size", "0"], ["--size", "1000000"], ["--threads", "0"], ["--dtype", "float16"],
    ["--model", "/no/such/model/dir"], ["--out", "/no/such/dir/profile.json"], ["--out", "."],
]


def _never(*args: object, **kwargs: object) -> None:
    raise AssertionError("work started before the inputs were checked")


@pytest.fixture(autouse=True)
def _no_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cli_mod, "simulate", _never)
    monkeypatch.setattr(planner_mod, "candidates", _never)
    monkeypatch.setattr(calibrate_mod, "measure", _never)
    monkeypatch.chdir(tmp_path)  # relative --plot paths land in a scratch directory


def _one_line_error(main: object, argv: list[str], prog: str,
                    capsys: pytest.CaptureFixture[str]) -> str:
    start_s = time.monotonic()
    rc = main(argv)  # type: ignore[operator]
    elapsed_s = time.monotonic() - start_s
    captured = capsys.readouterr()
    assert rc == 2, (argv, captured.err)
    assert captured.err.startswith(f"{prog}: error: "), captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    assert captured.out == ""
    assert elapsed_s < FAST_S, (argv, elapsed_s)
    return captured.err


@pytest.mark.parametrize("extra", SIM_CASES, ids=" ".join)
def test_sim_rejects(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(sim_main, [*SIM, *extra], "tessera sim", capsys)


@pytest.mark.parametrize("extra", PLAN_CASES, ids=" ".join)
def test_plan_rejects_before_searching(extra: list[str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(plan_main, [*PLAN, *extra], "tessera plan", capsys)


@pytest.mark.parametrize("extra", CALIBRATE_CASES, ids=" ".join)
def test_calibrate_rejects_before_measuring(extra: list[str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(sim_main, ["calibrate", *extra], "tessera sim", capsys)


def test_plot_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what find_spec sees when absent
    err = _one_line_error(plan_main, [*PLAN, "--plot", "f.png"], "tessera plan", capsys)
    assert "matplotlib" in err and "tessera[sim]" in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="needs POSIX permissions that bind the test's user")
def test_plot_into_read_only_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        err = _one_line_error(plan_main, [*PLAN, "--plot", str(locked / "f.png")],
                              "tessera plan", capsys)
    finally:
        locked.chmod(0o700)
    assert "not writable" in err


@pytest.mark.processes
def test_entry_point_exits_2_without_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "plan", *PLAN, "--plot",
         str(tmp_path / "missing" / "f.png")],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr


def _deployment(**kw: object) -> Deployment:
    return Deployment(**{"mode": "colocated", "precision": "fp8", "num_dp": 8, **kw})  # type: ignore[arg-type]


def _workload(**kw: object) -> Workload:
    return Workload(**{"num_requests": 50, "input_tokens": 100, "output_tokens": 10,  # type: ignore[arg-type]
                       "concurrency": 8, **kw})


@pytest.mark.parametrize("dep, wl, seed", [
    (_deployment(num_dp=0), _workload(), 0),
    (_deployment(tp=-1), _workload(), 0),
    (_deployment(batch_per_dp=0), _workload(), 0),
    (_deployment(batch_per_dp=10**9), _workload(), 0),
    (_deployment(num_micro_batches=0), _workload(), 0),
    (_deployment(num_prefill_devices=-8), _workload(), 0),
    (_deployment(mtp_acceptance=math.nan), _workload(), 0),
    (_deployment(num_dp=2.0), _workload(), 0),
    (_deployment(mode="nope"), _workload(), 0),
    (_deployment(), _workload(num_requests=0), 0),
    (_deployment(), _workload(num_requests=1.5), 0),
    (_deployment(), _workload(num_requests=10**12), 0),
    (_deployment(), _workload(input_tokens=0), 0),
    (_deployment(), _workload(concurrency=-1), 0),
    (_deployment(), _workload(concurrency=None, request_rate_per_s=math.inf), 0),
    (_deployment(), _workload(concurrency=None, request_rate_per_s=math.nan), 0),
    (_deployment(), _workload(length_cv=math.inf), 0),
    (_deployment(), _workload(prefix_hit_fraction=math.nan), 0),
    (_deployment(), _workload(kv_tokens=0), 0),
    (_deployment(), _workload(), -1),
])
def test_scenario_rejects_bad_numbers(dep: Deployment, wl: Workload, seed: int) -> None:
    with pytest.raises(SimError):
        Scenario("dgx-h200", "qwen3-235b-a22b", dep, wl, seed=seed)


@pytest.mark.parametrize("kw", [
    {"num_chips": 0}, {"num_chips": 385}, {"tpot_slo_ms": math.nan}, {"tpot_slo_ms": 0.0},
    {"ttft_slo_ms": -1.0}, {"input_tokens": 0}, {"output_tokens": 1.5}, {"mtp": 2.0},
    {"precision": "fp8"}, {"precision": "fp4"}, {"top": -1}, {"hardware": "no-such-system"},
])
def test_plan_api_rejects_before_searching(kw: dict[str, object]) -> None:
    args: dict[str, object] = {"hardware": "cloudmatrix384", "model_name": "deepseek-v3",
                               "num_chips": 384, "tpot_slo_ms": 50.0, "ttft_slo_ms": None,
                               "input_tokens": 2000, "output_tokens": 500, **kw}
    with pytest.raises(SimError):
        planner_mod.plan(**args)  # type: ignore[arg-type]
