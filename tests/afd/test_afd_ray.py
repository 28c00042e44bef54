"""Ray placement on a local multi-node cluster (``ray.cluster_utils.Cluster``): the workers land
on different nodes and give the single-process engine's greedy tokens; a killed worker's actor
is found and the pool restarted on new actors; startup errors are one clear message and leave
no actors or placement groups behind."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tessera import LLM, SamplingParams
from tessera.afd.front import WorkerStartupError
from tessera.config import AFDConfig

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = [pytest.mark.processes, pytest.mark.ray]

COMMON = dict(dtype="float32", device="cpu", kv_cache_memory=1 << 22, num_threads=1)
# A pool start on one-CPU Ray nodes of a busy two-core machine took 1.5-4 minutes (actor
# processes, then model loads): each start has explicit deadlines (STARTUP_S, the placement
# timeout) that end in a clear error, and the watchdog leaves room for two starts.
STARTUP_S = 240.0
WATCHDOG_S = 600
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = [[1, 2, 3], [7] * 11, [40, 41, 42, 43, 44]]


@pytest.fixture(scope="module")
def cluster():
    """Three nodes of one CPU each, so a 1:2 pool (three one-CPU bundles) must span them."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def _wait_all_released(timeout_s: float = 10.0) -> None:
    """No placement group of ours is left and every CPU of the cluster is free again (so no
    actor holds one)."""

    def held() -> list:
        groups = [g for g in ray.util.placement_group_table().values()
                  if g["state"] in ("CREATED", "PENDING", "RESCHEDULING")]
        free = ray.available_resources().get("CPU", 0.0)
        return groups + ([f"{free} of 3 CPUs free"] if free != 3.0 else [])

    end = time.monotonic() + timeout_s
    while held() and time.monotonic() < end:
        time.sleep(0.2)
    assert held() == []


def test_bad_address_is_one_clear_error(model_factory):
    # First in the file: a connection, once made, is kept for the process.
    assert not ray.is_initialized()
    path, _ = model_factory("llama")
    with pytest.raises(WorkerStartupError, match="cannot connect to the Ray cluster at "
                                                 "'127.0.0.1:1'"):
        LLM(str(path), attention_workers=1, ffn_workers=1, ray_address="127.0.0.1:1", **COMMON)
    with pytest.raises(ValueError, match="ray_address needs attention_workers"):
        LLM(str(path), ray_address="auto", **COMMON)
    with pytest.raises(ValueError, match="Ray Client"):
        AFDConfig(ray_address="ray://head:10001")


@pytest.mark.slow
def test_multi_node_tokens_match_and_a_killed_worker_recovers(cluster, model_factory):
    path, _ = model_factory("llama")
    reference = LLM(str(path), **COMMON).generate(PROMPTS, GREEDY, use_tqdm=False)
    afd = AFDConfig(attention_workers=1, ffn_workers=2, micro_batches=2,
                    ray_address=cluster.address, heartbeat_interval_s=0.2, failure_detect_s=2.0,
                    startup_timeout_s=STARTUP_S)
    llm = LLM(str(path), afd=afd, **COMMON)
    try:
        engine = llm.engine
        pool = engine._pool
        assert len(set(pool.node_ids.values())) == 3  # one worker per node: the data plane really crosses nodes
        assert pool.configs[0].front_address.startswith("tcp://")
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        for got, want in zip(outs, reference, strict=True):
            assert got.outputs[0].finish_reason == "length"
            assert got.outputs[0].token_ids == want.outputs[0].token_ids

        # Kill an FFN worker's process mid-generation: both requests end with an error
        # naming it, the pool is rebuilt on new actors, and it serves correctly again.
        long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        engine.add_request("x", [5] * 4, long)
        engine.add_request("y", [9] * 7, long)
        while not any(d.request_id == "x" for d in engine.step_with_deltas().deltas):
            pass
        old_group, old_runs = pool._pg, list(pool._runs)
        os.kill(pool.pids["ffn1.g0"], signal.SIGKILL)
        finished = []
        start = time.monotonic()
        while engine.has_unfinished_requests():
            finished += engine.step()
        # failure_detect_s is 2 s; the bound is the 10 s default because a Ray cluster of
        # one-CPU nodes on a small, busy CI machine can starve the front for seconds. The
        # errors do not wait for the new pool's actors to be placed.
        assert time.monotonic() - start < 10.0
        # The old generation is gone before a new one asks for the same three CPUs.
        assert ray.util.placement_group_table(old_group)["state"] == "REMOVED"
        assert ray.wait(old_runs, num_returns=len(old_runs), timeout=0)[1] == []
        assert {o.request_id for o in finished} == {"x", "y"}
        for out in finished:
            assert out.outputs[0].finish_reason == "error"
            assert "ffn1" in (out.outputs[0].error or ""), out.outputs[0].error
        assert engine.num_recoveries == 1
        again = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
        assert again[0].outputs[0].token_ids == reference[0].outputs[0].token_ids
        assert engine._pool is not pool and set(engine._pool.pids) == {
            "attn0.g1", "ffn0.g1", "ffn1.g1"}
    finally:
        llm.close()
    _wait_all_released()


def test_startup_errors_leave_nothing_behind(cluster, model_factory, tmp_path):
    path, _ = model_factory("llama")
    # More CPUs per worker than any node has: the placement group cannot be granted.
    afd = AFDConfig(attention_workers=1, ffn_workers=1, ray_address=cluster.address,
                    placement_timeout_s=1.0)
    with pytest.raises(WorkerStartupError, match=r"cannot place 2 workers of \{'CPU': 2\.0\}"):
        LLM(str(path), afd=afd, **(COMMON | {"num_threads": 2}))
    _wait_all_released()
    # A worker that fails to load (a model directory without weights).
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    afd = AFDConfig(attention_workers=1, ffn_workers=1, ray_address=cluster.address)
    with pytest.raises(WorkerStartupError, match=r"^(attn0|ffn0): "):
        LLM(str(broken), afd=afd, **COMMON)
    _wait_all_released()
