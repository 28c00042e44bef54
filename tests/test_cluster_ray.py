"""Data-parallel instances as Ray actors on a local multi-node cluster
(``ray.cluster_utils.Cluster``): they land on different nodes, talk to the front over CURVE TCP
sockets that admit nobody else, give the single engine's tokens, and a killed one is restarted
while its requests finish on the other."""

from __future__ import annotations

import os
import signal
import time

import pytest
import zmq

from tessera import LLM, SamplingParams
from tests.models import reference_gaps
from tests.test_kv_tiers import TOL, _prompts

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = [pytest.mark.processes, pytest.mark.ray, pytest.mark.slow]

COMMON = dict(dtype="float32", device="cpu", kv_cache_memory=4 << 20, num_threads=1,
              max_num_batched_tokens=64)
PARAMS = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    """Two nodes of one CPU each, so two one-CPU instances must use both."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def _until(condition, what: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_an_unreachable_ray_cluster_is_one_clear_error(model_factory):
    if ray.is_initialized():
        pytest.skip("this process is connected to a Ray cluster already (kept once made)")
    path, _ = model_factory("llama")
    with pytest.raises(ValueError, match="cannot connect to the Ray cluster at '127.0.0.1:1'"):
        LLM(str(path), data_parallel=2, instances_ray_address="127.0.0.1:1", **COMMON)


def test_instances_on_ray_nodes(cluster, model_factory):
    path, hf = model_factory("llama")
    prompts = _prompts(27)
    llm = LLM(str(path), data_parallel=2, instances_ray_address=cluster.address, **COMMON)
    engine = llm.engine
    try:
        instances = engine._set.instances
        assert len({inst.process.node_id for inst in instances}) == 2
        # TCP sockets with CURVE both ways (tests/test_curve.py: only the named peer gets in).
        assert all(inst.output.getsockopt(zmq.CURVE_SERVER) for inst in instances)
        assert all(inst.input.getsockopt_string(zmq.LAST_ENDPOINT).startswith("tcp://")
                   for inst in instances)
        outs = llm.generate(prompts, PARAMS, use_tqdm=False)
        for prompt, out in zip(prompts, outs, strict=True):
            assert out.outputs[0].finish_reason == "length"
            assert max(reference_gaps(hf, prompt, out.outputs[0].token_ids)) <= TOL

        # Kill one actor's process mid-generation: its requests finish on the other, and it
        # comes back.
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, PARAMS)
        victim = instances[0].process.pid
        outputs, killed = {}, False
        while engine.has_unfinished_requests():
            step = engine.step_with_deltas()
            outputs |= {o.request_id: o for o in step.finished}
            if not killed and step.deltas:
                os.kill(victim, signal.SIGKILL)
                killed = True
        assert engine.num_instance_failures == 1
        for i, prompt in enumerate(prompts):
            out = outputs[f"r{i}"].outputs[0]
            assert out.finish_reason == "length", out.error
            assert max(reference_gaps(hf, prompt, out.token_ids)) <= TOL
        _until(lambda: engine.stats() is not None and all(engine.router.up),
               "the killed instance did not come back")
    finally:
        llm.close()
    _until(lambda: ray.available_resources().get("CPU", 0.0) == 2.0,
           "the instances' actors still hold CPUs", timeout_s=60)


