"""Deployment files: ``tessera plan --emit-deployment`` writes one, ``engine_config`` (``LLM``,
``tessera serve --deployment``) turns it into the engine options that launch it, and a file
that is not a deployment, or one this runtime cannot launch, is refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tessera import deployment_file as df
from tessera.deployment_file import host_cpus
from tessera.engine_args import engine_config
from tessera.sim.cli import plan_main
from tessera.sim.deployment import Deployment as SimDeployment
from tessera.sim.emit import deployment_file_of, pools_of
from tessera.sim.hardware import get_system

EXAMPLE_PROFILE = (Path(__file__).resolve().parents[1] / "tessera" / "sim" / "data"
                   / "cpu-local-example.json")
WORKLOAD = df.Workload(input_tokens=256, output_tokens=32, tpot_slo_ms=100.0)


@pytest.fixture
def one_thread_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A local profile whose devices are one engine thread each."""
    raw = json.loads(EXAMPLE_PROFILE.read_text())
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(raw | {"threads_per_device": 1}))
    monkeypatch.setenv("TESSERA_SIM_PROFILE", str(path))
    return path


def _file(tmp_path: Path, dep: df.Deployment) -> str:
    path = tmp_path / "deployment.json"
    df.write(dep, path)
    return str(path)


def _pd(**pool: object) -> df.Deployment:
    prefill = df.Pool(role="prefill", instances=1, devices_per_instance=1, max_num_seqs=8,
                      max_num_batched_tokens=512)
    decode = df.Pool(role="decode", instances=1, devices_per_instance=1, max_num_seqs=8,
                     max_num_batched_tokens=64)
    return df.Deployment(format=df.FORMAT, hardware="cpu-local", model="m", precision="fp32",
                         mode="pd", pools=[prefill, df.Pool(**{**df.msgspec.structs.asdict(
                             decode), **pool})], threads_per_device=1)


def test_local_devices_are_the_profiles_threads(one_thread_profile: Path) -> None:
    system = get_system("cpu-local")
    assert system.threads_per_device == 1
    assert system.num_devices == host_cpus()


@pytest.mark.skipif(host_cpus() < 2, reason="needs two CPUs for two one-thread devices")
def test_plan_emits_a_deployment_the_engine_options_launch(one_thread_profile: Path,
                                                           tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           ) -> None:
    out = tmp_path / "plan.json"
    rc = plan_main(["--hardware", "cpu-local", "--model", "qwen2.5-0.5b", "--chips", "2",
                    "--tpot-slo-ms", "1e6", "--input-tokens", "256", "--output-tokens", "16",
                    "--top", "1", "--emit-deployment", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert f"deployment written to {out}" in capsys.readouterr().out
    dep = df.read(out)
    assert dep.hardware == "cpu-local" and dep.precision == "fp32"
    assert dep.threads_per_device == 1 and dep.num_devices == 2
    assert dep.predicted is not None and dep.predicted.simulated is not None
    assert all(p.devices_per_instance == 1 and not p.attention_workers for p in dep.pools)
    options = df.engine_options(dep, num_host_cpus=2)
    assert options["dtype"] == "float32" and options["num_threads"] == 1
    if dep.mode == "pd":
        assert (options["prefill_instances"], options["decode_instances"]) == (1, 1)
    else:
        assert options["data_parallel"] == 2
    decode = dep.pool("decode") or dep.pool("both")
    assert decode is not None and options["max_num_seqs"] == decode.max_num_seqs


def test_plan_without_a_deployment_under_the_slo_writes_nothing(
        one_thread_profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    rc = plan_main(["--hardware", "cpu-local", "--model", "qwen2.5-0.5b", "--chips", "1",
                    "--tpot-slo-ms", "0.001", "--input-tokens", "256", "--output-tokens", "16",
                    "--emit-deployment", str(out)])
    assert rc == 2 and not out.exists()
    assert "no deployment meets the SLO" in capsys.readouterr().err
    rc = plan_main(["--hardware", "cpu-local", "--model", "qwen2.5-0.5b", "--chips", "1",
                    "--tpot-slo-ms", "1e6", "--input-tokens", "256", "--output-tokens", "16",
                    "--emit-deployment", str(tmp_path / "no" / "such" / "dir.json")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_catalog_plans_say_what_cannot_run_here() -> None:
    system = get_system("dgx-h200")
    tp = SimDeployment(mode="colocated", num_dp=2, tp=4, precision="bf16")
    dep = deployment_file_of(tp, system, "llama-3-70b", WORKLOAD, 1.0, 2.0, 3.0, None)
    with pytest.raises(df.DeploymentError, match="tensor parallelism"):
        df.engine_options(dep)
    fp8 = SimDeployment(mode="colocated", num_dp=8, precision="fp8")
    with pytest.raises(df.DeploymentError, match="precision fp8 is not runnable"):
        df.engine_options(deployment_file_of(fp8, system, "m", WORKLOAD, 1.0, 2.0, 3.0, None))
    afd = SimDeployment(mode="afd", num_dp=4, num_ffn_devices=2, num_micro_batches=2,
                        num_prefill_devices=2, prefill_instance_devices=1, precision="bf16")
    pools = pools_of(afd)
    assert [p.role for p in pools] == ["prefill", "decode"]
    assert (pools[1].attention_workers, pools[1].ffn_workers, pools[1].micro_batches) == (4, 2, 2)
    # Behind prefill instances, each decode instance is a Transformerless group.
    options = df.engine_options(deployment_file_of(afd, system, "m", WORKLOAD, 1.0, 2.0, 3.0,
                                                   None))
    assert (options["prefill_instances"], options["decode_instances"]) == (2, 1)
    assert (options["decode_attention_workers"], options["decode_ffn_workers"],
            options["decode_micro_batches"]) == (4, 2, 2)
    # A colocated data-parallel plan runs as it is: one GPU per instance (checked at launch).
    dp = SimDeployment(mode="colocated", num_dp=8, batch_per_dp=32, precision="bf16",
                       chunk_tokens_per_group=256)
    options = df.engine_options(deployment_file_of(dp, system, "m", WORKLOAD, 1.0, 2.0, 3.0,
                                                   None))
    assert options == {"dtype": "bfloat16", "max_num_seqs": 32, "max_num_batched_tokens": 256,
                       "data_parallel": 8}


@pytest.mark.parametrize(("text", "needle"), [
    (b"not json", "not a JSON deployment file"),
    (b"[]", "Expected `object`"),
    (b'{"format": "tessera-deployment/1"}', "missing required field"),
])
def test_unreadable_files(tmp_path: Path, text: bytes, needle: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(text)
    with pytest.raises(df.DeploymentError, match=needle):
        df.read(path)


@pytest.mark.parametrize(("change", "needle"), [
    (lambda d: d | {"format": "tessera-deployment/9"}, "is not 'tessera-deployment/1'"),
    (lambda d: d | {"extra": 1}, "unknown field `extra`"),
    (lambda d: d | {"mode": "ring"}, r"Invalid enum value 'ring' - at `\$.mode`"),
    (lambda d: d | {"pools": d["pools"][:1]}, "has pools prefill, decode, not prefill"),
    (lambda d: d | {"pools": [d["pools"][0] | {"instances": -1}, d["pools"][1]]},
     r"instances must be in \[1, 64\], got -1"),
    (lambda d: d | {"pools": [d["pools"][0] | {"instances": "2"}, d["pools"][1]]},
     r"Expected `int`, got `str` - at `\$.pools\[0\].instances`"),
    (lambda d: d | {"pools": [d["pools"][0], d["pools"][1] | {"max_num_seqs": 10**12}]},
     r"max_num_seqs must be in"),
    (lambda d: d | {"pools": [d["pools"][0], d["pools"][1] | {"attention_workers": 2}]},
     "attention_workers and ffn_workers go together"),
    (lambda d: d | {"threads_per_device": 0}, "threads_per_device must be in"),
])
def test_bad_fields_are_named(tmp_path: Path, change, needle: str) -> None:
    raw = json.loads(df.msgspec.json.encode(_pd()))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(change(raw)))
    with pytest.raises(df.DeploymentError, match=needle):
        df.read(path)


def test_oversized_and_missing_files(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (df.MAX_FILE_BYTES + 1))
    with pytest.raises(df.DeploymentError, match="at most"):
        df.read(big)
    with pytest.raises(df.DeploymentError, match="cannot read deployment file"):
        df.read(tmp_path / "absent.json")


def test_engine_config_takes_the_file_and_refuses_contradictions(tmp_path: Path) -> None:
    path = _file(tmp_path, _pd())
    config = engine_config("some/model", deployment=path, device="cpu")
    assert config.cluster is not None
    assert (config.cluster.prefill_instances, config.cluster.decode_instances) == (1, 1)
    assert config.scheduler.max_num_seqs == 8
    assert config.scheduler.max_num_batched_tokens == 512  # the prefill pool's budget
    assert config.num_threads == 1 and config.dtype == "float32"
    # The file's value, or a default, may be given too; another value may not.
    engine_config("some/model", deployment=path, max_num_seqs=8, router_policy="round_robin")
    with pytest.raises(ValueError, match="sets max_num_seqs = 8; the option given as 3"):
        engine_config("some/model", deployment=path, max_num_seqs=3)
    with pytest.raises(ValueError, match="sets dtype = 'float32'"):
        engine_config("some/model", deployment=path, dtype="bfloat16")
    wide = df.Deployment(**{**df.msgspec.structs.asdict(_pd()), "threads_per_device": 4096})
    with pytest.raises(ValueError, match="needs 8192 CPU threads"):
        engine_config("some/model", deployment=_file(tmp_path, wide))
