"""Data-parallel instances behind the KV-aware router: the single engine's greedy tokens
(teacher-forced) for dense, MoE and MLA models, prefixes routed to the instance holding them,
aborts that leak no block, and an instance killed mid-flight whose requests finish elsewhere."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tessera import LLM, SamplingParams
from tessera.outputs import SpecDecodeStats
from tests.models import reference_gaps
from tests.test_kv_tiers import TOL, _prompts
from tests.test_serve_util import ServerProcess, pid_alive

pytestmark = pytest.mark.processes

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
COMMON = dict(dtype="float32", device="cpu", num_threads=1, kv_cache_memory=4 << 20,
              max_num_batched_tokens=64)


def _check(hf, prompts, outputs) -> None:
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.outputs[0].finish_reason == "length", out.outputs[0].error
        gaps = reference_gaps(hf, prompt, out.outputs[0].token_ids)
        assert max(gaps) <= TOL, f"token off the reference argmax by {max(gaps):.2e}"


def _until(condition, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.parametrize("arch", ["llama", "qwen3-moe", "deepseek-v3"])
def test_outputs_match_the_single_engine_and_prefixes_find_their_instance(model_factory,
                                                                          arch):
    path, hf = model_factory(arch)
    prompts = _prompts(7)  # three conversations of three growing turns each
    llm = LLM(str(path), data_parallel=2, **COMMON)
    try:
        pids = llm.engine.instance_pids
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        _check(hf, prompts, llm.generate(prompts, PARAMS, use_tqdm=False))
        router = llm.engine.router
        assert sum(router.num_placed) == len(prompts)
        # The router's expectations of what it sent lapse; its KV events alone remain.
        for i in range(2):
            for prompt in prompts:
                router.index.overlap(i, router.prompt_keys(prompt), now_s=float("inf"))
        # A second pass: each prompt's blocks are cached on some instance, and the router
        # sends it there (its KV events said so), so nearly every prompt block is a hit.
        hits_before = llm.engine.stats().num_prefix_hit_tokens_total
        routed_before = sum(router.num_hit_tokens)
        for prompt in prompts:  # one at a time: no load to weigh against the prefix
            _check(hf, [prompt], llm.generate([prompt], PARAMS, use_tqdm=False))
        num_full_blocks = sum((len(p) - 1) // 16 for p in prompts)
        assert sum(router.num_hit_tokens) - routed_before >= 0.9 * num_full_blocks * 16
        stats = llm.engine.stats()
        assert stats.num_prefix_hit_tokens_total - hits_before >= 0.9 * num_full_blocks * 16
        assert stats.kv_cache_usage == 0
    finally:
        llm.close()
    _until(lambda: not any(pid_alive(p) for p in pids), "an instance outlived close()")


def test_round_robin_spreads_and_misses(model_factory):
    """The peer policy: the same prompts alternate instances, so a prefix seen once on one
    instance is recomputed on the other."""
    path, hf = model_factory("llama")
    prompt = _prompts(8)[2]
    llm = LLM(str(path), data_parallel=2, router_policy="round_robin", **COMMON)
    try:
        for _ in range(2):
            _check(hf, [prompt], llm.generate([prompt], PARAMS, use_tqdm=False))
        assert llm.engine.router.num_placed == [1, 1]
        assert llm.engine.stats().num_prefix_hit_tokens_total == 0
    finally:
        llm.close()


def test_aborts_leak_no_block(model_factory):
    path, _ = model_factory("llama")
    llm = LLM(str(path), data_parallel=2, **COMMON)
    engine = llm.engine
    try:
        long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        prompts = _prompts(9)[:4]
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, long)
        engine.abort_request("r0")  # queued
        seen: set[str] = set()
        while len(seen) < 3:
            seen |= {d.request_id for d in engine.step_with_deltas().deltas}
        assert "r0" not in seen
        for i in (1, 2, 3):  # mid-decode
            assert engine.abort_request(f"r{i}")
        assert not engine.has_unfinished_requests()
        _until(lambda: engine.stats().kv_cache_usage == 0 and engine.stats().num_running == 0,
               "blocks still in use after the aborts")
    finally:
        llm.close()


def test_a_killed_instance_s_requests_finish_elsewhere_and_it_comes_back(model_factory):
    path, hf = model_factory("llama")
    prompts = _prompts(10)[:4]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    llm = LLM(str(path), data_parallel=2, router_policy="round_robin", **COMMON)
    engine = llm.engine
    try:
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
        victim_pid = engine.instance_pids[0]
        outputs, killed = {}, False
        while engine.has_unfinished_requests():
            step = engine.step_with_deltas()
            for out in step.finished:
                outputs[out.request_id] = out
            # Round robin put r0 and r2 on instance 0: kill it once one of them has tokens.
            if not killed and any(d.request_id in ("r0", "r2") for d in step.deltas):
                os.kill(victim_pid, signal.SIGKILL)
                killed = True
        assert engine.num_instance_failures == 1
        assert engine.num_retried_requests == 2  # continued from their tokens elsewhere
        _check(hf, prompts, [outputs[f"r{i}"] for i in range(len(prompts))])
        assert all(len(o.outputs[0].token_ids) == 30 for o in outputs.values())
        # The instance is started again and takes requests.
        _until(lambda: engine.stats() is not None and all(engine.router.up),
               "the killed instance was not restarted")
        assert engine.instance_pids[0] != victim_pid
        _check(hf, prompts, llm.generate(prompts, PARAMS, use_tqdm=False))
        assert all(n > 0 for n in engine.router.num_placed)
        assert engine.stats().kv_cache_usage == 0
    finally:
        llm.close()


def test_serve_with_data_parallel(model_factory):
    path, _ = model_factory("llama")
    reference = LLM(str(path), **COMMON)
    prompt = _prompts(11)[1]
    [expected] = reference.generate([prompt], PARAMS, use_tqdm=False)
    server = ServerProcess(path, "--data-parallel", "2", "--router-policy", "kv")
    try:
        server.wait_ready(timeout_s=240)
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0,
                "ignore_eos": True}
        for _ in range(2):
            r = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == expected.outputs[0].text
        assert server.metric("tessera:prefix_cache_hits_total") > 0
        metrics = httpx.get(f"{server.base_url}/metrics", timeout=5).text

        def series(name: str) -> dict[str, float]:
            """Values of ``name`` by instance label."""
            out = {}
            for line in metrics.splitlines():
                if line.startswith(name + "{") and 'role="both"' in line:
                    instance = line.split('instance="', 1)[1].split('"', 1)[0]
                    out[instance] = float(line.rsplit(" ", 1)[1])
            return out

        assert series("tessera:instance_up") == {"0": 1.0, "1": 1.0}
        assert sum(series("tessera:router_routed_requests_total").values()) == 2
    finally:
        server.stop()


def test_bad_cluster_flags_are_one_line_errors(model_factory):
    import subprocess
    import sys

    path, _ = model_factory("llama")
    for flags, message in (
        (["--router-policy", "kv"], "--router-policy needs --data-parallel or"),
        (["--data-parallel", "0"], "data_parallel must be at least 1"),
        (["--data-parallel", "2", "--router-policy", "nope"], "invalid choice"),
    ):
        r = subprocess.run([sys.executable, "-m", "tessera.cli", "serve", str(path),
                            *flags], capture_output=True, text=True, timeout=120)
        assert r.returncode != 0
        assert message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_instances_share_one_host_tier(model_factory):
    """With kv_offload_memory the front starts one host KV store for its instances: a prefix
    computed on one instance is loaded by the other from it."""
    from tessera.engine.model_runner import ModelRunner

    path, hf = model_factory("llama")
    probe = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=1 << 20)
    per_block = ModelRunner.kv_bytes_per_block(probe.engine.model, 16)
    prompt = _prompts(12)[2]
    llm = LLM(str(path), data_parallel=2, router_policy="round_robin",
              **(COMMON | dict(kv_cache_memory=12 * per_block)), kv_offload_memory=8 << 20)
    try:
        for _ in range(2):  # round robin: instance 0, then instance 1
            _check(hf, [prompt], llm.generate([prompt], PARAMS, use_tqdm=False))
        host = {t.tier: t for t in llm.engine.stats().kv_tiers}["host"]
        assert host.num_hit_tokens_total >= (len(prompt) - 1) // 16 * 16 - 16
        assert llm.engine.stats().num_prefix_hit_tokens_total == 0  # not from a device cache
    finally:
        llm.close()


def test_a_stalled_instance_is_replaced_and_its_requests_finish_elsewhere(model_factory):
    """SIGSTOP an instance with requests: after the stall timeout it is killed and started
    again, and its requests are continued on the other instance with the right tokens."""
    path, hf = model_factory("llama")
    prompts = _prompts(13)[:4]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    llm = LLM(str(path), data_parallel=2, router_policy="round_robin",
              instance_stall_timeout_s=5.0, **COMMON)
    engine = llm.engine
    try:
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
        victim_pid = engine.instance_pids[0]
        outputs, stopped = {}, False
        try:
            while engine.has_unfinished_requests():
                step = engine.step_with_deltas()
                outputs |= {o.request_id: o for o in step.finished}
                if not stopped and any(d.request_id in ("r0", "r2") for d in step.deltas):
                    os.kill(victim_pid, signal.SIGSTOP)  # alive, silent
                    stopped = True
        finally:
            if pid_alive(victim_pid):
                os.kill(victim_pid, signal.SIGCONT)
        assert engine.num_instance_failures == 1 and engine.num_retried_requests == 2
        _check(hf, prompts, [outputs[f"r{i}"] for i in range(len(prompts))])
        _until(lambda: not pid_alive(victim_pid), "the stalled instance was not killed")
        _until(lambda: engine.stats() is not None and all(engine.router.up),
               "the stalled instance was not restarted")
    finally:
        llm.close()


def test_speculative_decoding_in_every_instance():
    """Each instance drafts and verifies on its own: the demo model's copies come out as from
    the single engine, several tokens a step reach the front in order, and the front sums the
    instances' draft counters."""
    from tessera.demo_model import model_dir
    from tessera.demo_model.tasks import copy
    from tessera.demo_model.train import render

    options = dict(COMMON, speculative_method="ngram", num_speculative_tokens=8)
    single = LLM(str(model_dir()), **options)
    prompts = [render(copy(w))[0] for w in ("abcdefgh", "qwerty", "zyxwvu", "mnopqr")]
    params = SamplingParams(temperature=0.0, max_tokens=20)
    want = [o.outputs[0].token_ids for o in single.generate(prompts, params, use_tqdm=False)]
    llm = LLM(str(model_dir()), data_parallel=2, router_policy="round_robin", **options)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == want
        _until(lambda: (llm.engine.stats().spec_decode or SpecDecodeStats())
               .num_accepted_tokens_total > 0, "no accepted draft counted")
    finally:
        llm.close()
