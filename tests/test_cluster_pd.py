"""Prefill/decode instances: a prefill instance computes the prompt and first token, its full
blocks travel through the shared host KV tier, and a decode instance goes on. Greedy tokens
are the single engine's (teacher-forced) for dense, MoE and MLA models in 1P1D, 1P2D and
2P1D; streams end once; aborts at each stage and killed instances leave no block behind."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tessera import LLM, SamplingParams
from tests.test_cluster import COMMON, PARAMS, _check, _until
from tests.test_kv_tiers import _prompts

pytestmark = pytest.mark.processes


def _host(llm: LLM):
    return {t.tier: t for t in llm.engine.stats().kv_tiers}["host"]


def _idle(llm: LLM) -> bool:
    stats = llm.engine.stats()
    return stats.kv_cache_usage == 0 and stats.num_running == 0 and stats.num_waiting == 0


@pytest.mark.parametrize(("arch", "num_prefill", "num_decode"),
                         [("llama", 1, 1), ("qwen3-moe", 1, 2), ("deepseek-v3", 2, 1)])
def test_outputs_match_the_single_engine(model_factory, arch, num_prefill, num_decode):
    path, hf = model_factory(arch)
    prompts = _prompts(21)
    llm = LLM(str(path), prefill_instances=num_prefill, decode_instances=num_decode, **COMMON)
    engine = llm.engine
    try:
        assert engine.roles == ["prefill"] * num_prefill + ["decode"] * num_decode
        _check(hf, prompts, llm.generate(prompts, PARAMS, use_tqdm=False))
        assert engine.num_handoffs == len(prompts)
        # Each handoff's blocks were pinned in the store and released once decoding.
        leases = engine._set.leases
        assert leases.num_leases == len(prompts) and leases.num_held == 0
        assert leases.num_failed_calls == 0
        # The decode side loaded the prompts' full blocks from the host tier.
        assert _host(llm).num_hit_tokens_total > 0
        # Again: prefixes now hit the device caches on both sides.
        hits = engine.stats().num_prefix_hit_tokens_total
        _check(hf, prompts, llm.generate(prompts, PARAMS, use_tqdm=False))
        assert engine.stats().num_prefix_hit_tokens_total > hits
        roles = {s.role for s in engine.stats().instances}
        assert roles == {"prefill", "decode"}
        _until(lambda: _idle(llm), "blocks still in use at idle")
    finally:
        llm.close()


def test_each_stream_ends_once_and_what_cannot_move_runs_whole(model_factory):
    path, hf = model_factory("llama")
    prompts = _prompts(22)[:3]
    llm = LLM(str(path), prefill_instances=1, decode_instances=1, **COMMON)
    engine = llm.engine
    try:
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, PARAMS)
        # Two completions cannot be split: they run whole on the decode instance.
        engine.add_request("n2", prompts[0], SamplingParams(n=2, max_tokens=4, seed=1))
        finishes: dict[tuple[str, int], list[str | None]] = {}
        outputs = {}
        while engine.has_unfinished_requests():
            step = engine.step_with_deltas()
            for d in step.deltas:
                finishes.setdefault((d.request_id, d.index), []).append(d.finish_reason)
            outputs |= {o.request_id: o for o in step.finished}
        for i in range(len(prompts)):
            assert finishes[(f"r{i}", 0)] == [None] * 5 + ["length"]
        assert finishes[("n2", 0)][-1] == finishes[("n2", 1)][-1] == "length"
        assert engine.num_handoffs == len(prompts)
        _check(hf, prompts, [outputs[f"r{i}"] for i in range(len(prompts))])
        assert outputs["r0"].prompt_token_ids == prompts[0]
        assert engine.stats().instances[0].num_routed_total == len(prompts)
    finally:
        llm.close()


def test_aborts_at_each_stage_leak_no_block(model_factory):
    path, _ = model_factory("llama")
    llm = LLM(str(path), prefill_instances=1, decode_instances=1, **COMMON)
    engine = llm.engine
    long = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
    try:
        prompts = _prompts(23)[:4]
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, long)
        assert engine.abort_request("r0")  # queued on the prefill instance
        decoding: set[str] = set()
        while len(decoding) < 3:
            for d in engine.step_with_deltas().deltas:
                decoding.add(d.request_id)
        assert engine.abort_request("r1")  # its first token out: handed off, or about to be
        deadline = time.monotonic() + 120
        while not all(engine.requests[r].phase == "decode" for r in ("r2", "r3")):
            assert time.monotonic() < deadline, "no handoff"
            engine.step_with_deltas()
        for _ in range(3):
            engine.step_with_deltas()
        for request_id in ("r2", "r3"):  # decoding on the decode instance
            assert engine.abort_request(request_id)
        assert not engine.has_unfinished_requests()
        _until(lambda: _idle(llm), "blocks still in use after the aborts")
    finally:
        llm.close()


def test_a_killed_store_mid_handoff_costs_recompute_not_tokens(model_factory):
    """SIGKILL the shared host store (the handoff's transfer peer) while requests are handed
    over: the decode instance computes what it cannot load, every token is right, the front
    starts the store again and later handoffs go through it."""
    from tests.test_serve_util import pid_alive

    path, hf = model_factory("llama")
    prompts = _prompts(25)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    llm = LLM(str(path), prefill_instances=1, decode_instances=1, **COMMON)
    engine = llm.engine
    try:
        store = engine._set._store
        first_pid = store.pid
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
        outputs, killed = {}, False
        while engine.has_unfinished_requests():
            step = engine.step_with_deltas()
            outputs |= {o.request_id: o for o in step.finished}
            if not killed and engine.num_handoffs >= 1:
                os.kill(first_pid, signal.SIGKILL)
                killed = True
        _check(hf, prompts, [outputs[f"r{i}"] for i in range(len(prompts))])
        assert engine.num_handoffs == len(prompts)
        _until(lambda: engine.stats() is not None and store.pid != first_pid
               and pid_alive(store.pid), "the store was not started again")
        hits = _host(llm).num_hit_tokens_total
        seeds = iter(range(100, 10_000))

        def handed_over_through_the_store() -> bool:
            # Fresh prompts each time: the engines reattach to the new store within seconds.
            more = _prompts(next(seeds))[:2]
            _check(hf, more, llm.generate(more, PARAMS, use_tqdm=False))
            return _host(llm).num_hit_tokens_total > hits

        _until(handed_over_through_the_store, "no handoff went through the restarted store")
        _until(lambda: _idle(llm), "blocks still in use at idle")
    finally:
        llm.close()


@pytest.mark.parametrize(("num_prefill", "num_decode", "victim"), [(1, 2, 1), (2, 1, 0)])
def test_a_killed_instance_s_requests_finish_on_its_peer(model_factory, num_prefill,
                                                         num_decode, victim):
    """SIGKILL a decode instance mid-decode (1P2D) or a prefill instance mid-prefill (2P1D):
    its requests finish on the other instance of its pool with the right tokens."""
    path, hf = model_factory("llama")
    prompts = _prompts(24)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    llm = LLM(str(path), prefill_instances=num_prefill, decode_instances=num_decode,
              router_policy="round_robin", **COMMON)
    engine = llm.engine
    try:
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
        victim_pid = engine.instance_pids[victim]
        outputs, killed = {}, False
        while engine.has_unfinished_requests():
            step = engine.step_with_deltas()
            outputs |= {o.request_id: o for o in step.finished}
            ready = (engine.num_handoffs >= 2 if engine.roles[victim] == "decode"
                     else bool(step.deltas))
            if not killed and ready:
                os.kill(victim_pid, signal.SIGKILL)
                killed = True
        assert engine.num_instance_failures == 1 and engine.num_retried_requests > 0
        _check(hf, prompts, [outputs[f"r{i}"] for i in range(len(prompts))])
        _until(lambda: engine.stats() is not None and all(engine.router.up),
               "the killed instance was not restarted")
        _until(lambda: _idle(llm), "blocks still in use at idle")
    finally:
        llm.close()


def test_a_planned_deployment_is_served(model_factory, tmp_path, monkeypatch):
    """plan -> launch: ``tessera plan --emit-deployment`` on the calibrated local machine (a
    profile of one-thread devices) writes a file that ``tessera serve --deployment`` runs as
    planned, with the single engine's tokens."""
    import json
    from pathlib import Path

    import httpx

    from tessera import deployment_file
    from tessera.deployment_file import host_cpus
    from tessera.sim.cli import plan_main
    from tests.test_serve_util import ServerProcess

    if host_cpus() < 2:
        pytest.skip("needs two CPUs for two one-thread devices")
    path, _ = model_factory("llama")
    example = Path(deployment_file.__file__).parent / "sim" / "data" / "cpu-local-example.json"
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(json.loads(example.read_text()) | {"threads_per_device": 1}))
    monkeypatch.setenv("TESSERA_SIM_PROFILE", str(profile))
    plan = tmp_path / "plan.json"
    assert plan_main(["--hardware", "cpu-local", "--model", str(path / "config.json"),
                      "--chips", "2", "--tpot-slo-ms", "1e6", "--input-tokens", "40",
                      "--output-tokens", "6", "--top", "1", "--emit-deployment",
                      str(plan)]) == 0
    dep = deployment_file.read(plan)
    roles = [p.role for p in dep.pools for _ in range(p.instances)]
    prompt = _prompts(23)[0]
    reference = LLM(str(path), **COMMON)
    [expected] = reference.generate([prompt], PARAMS, use_tqdm=False)
    server = ServerProcess(path, "--deployment", str(plan))
    try:
        server.wait_ready(timeout_s=240)
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0,
                "ignore_eos": True}
        r = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected.outputs[0].text
        metrics = httpx.get(f"{server.base_url}/metrics", timeout=5).text
        up = sorted(line.split('role="', 1)[1].split('"', 1)[0]
                    for line in metrics.splitlines() if line.startswith("tessera:instance_up{"))
        assert up == sorted(roles), metrics
    finally:
        server.stop()


def test_bad_deployment_files_are_one_line_errors(model_factory, tmp_path):
    import subprocess
    import sys

    from tessera import deployment_file

    path, _ = model_factory("llama")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "tessera-deployment/1", "pools": 3}')
    good = tmp_path / "good.json"
    pool = deployment_file.Pool(role="both", instances=2, devices_per_instance=1,
                                max_num_seqs=4, max_num_batched_tokens=64)
    deployment_file.write(deployment_file.Deployment(
        format=deployment_file.FORMAT, hardware="cpu-local", model="m", precision="fp32",
        mode="colocated", pools=[pool]), good)
    for flags, message in (
        (["--deployment", str(bad)], "Expected `array`, got `int` - at `$.pools`"),
        (["--deployment", str(tmp_path / "absent.json")], "cannot read deployment file"),
        (["--deployment", str(good), "--max-num-seqs", "9"], "sets max_num_seqs = 4"),
    ):
        r = subprocess.run([sys.executable, "-m", "tessera.cli", "serve", str(path), *flags],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_transformerless_decode_group_behind_a_prefill_instance(model_factory):
    """A decode instance may be a Transformerless group (attention and FFN workers): it loads
    the handed-over blocks from the shared host tier like a plain one, with the same tokens."""
    path, hf = model_factory("qwen3-moe")
    prompts = _prompts(24)[:3]
    llm = LLM(str(path), prefill_instances=1, decode_instances=1, decode_attention_workers=1,
              decode_ffn_workers=1, decode_micro_batches=1, **COMMON)
    engine = llm.engine
    try:
        _check(hf, prompts, llm.generate(prompts, PARAMS, use_tqdm=False))
        assert engine.num_handoffs == len(prompts)
        assert _host(llm).num_hit_tokens_total > 0
        assert [s.role for s in engine.stats().instances] == ["prefill", "decode"]
    finally:
        llm.close()


def test_decode_group_options_are_checked():
    from tessera.engine_args import engine_config

    for options, message in (
        (dict(prefill_instances=1, decode_instances=1, decode_attention_workers=1),
         "go together"),
        (dict(data_parallel=2, decode_attention_workers=1, decode_ffn_workers=1),
         "needs prefill_instances"),
        (dict(prefill_instances=1, decode_instances=1, decode_attention_workers=1,
              decode_ffn_workers=1, decode_micro_batches=99), "micro_batches"),
    ):
        with pytest.raises(ValueError, match=message):
            engine_config("m", **options)
