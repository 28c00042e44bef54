"""Pure pieces of disaggregated serving: micro-batch split, FFN placement, dense shards, config
validation, trace metric (no processes)."""

from __future__ import annotations

import msgspec
import pytest
import torch
import zmq

from tessera.afd.dataplane import brief
from tessera.afd.ffn_shard import DenseFFNShard
from tessera.afd.head_slice import HeadSlice, RemovedHead
from tessera.afd.placement import expert_ids_of, expert_owners, head_split, shard_range
from tessera.afd.trace import Tracer, hidden_transfer_fraction
from tessera.config import AFDConfig
from tessera.messages.common import Shutdown
from tessera.messages.workers import StepReport, WorkerConfig
from tessera.model.dense import DenseFFNUnit
from tessera.model.loader import load_model
from tessera.outputs import EngineStats, StepOutput, TokenDelta


def test_placement_covers_everything_once():
    for size, shards in [(10, 3), (8, 8), (7, 2), (128, 5)]:
        ranges = [shard_range(size, shards, i) for i in range(shards)]
        assert ranges[0][0] == 0 and ranges[-1][1] == size
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1
    owners = expert_owners(8, 3)
    for f in range(3):
        assert [e for e in range(8) if owners[e] == f] == expert_ids_of(8, 3, f)


def test_dense_shards_sum_to_the_unit(model_factory):
    path, _ = model_factory("llama")
    _, model = load_model(path, "float32", torch.device("cpu"))
    unit = model.units()[1]
    assert isinstance(unit, DenseFFNUnit)
    hidden = torch.randn(5, model.spec.hidden_size)
    normed = unit.norm(hidden)
    inter = model.spec.intermediate_size
    partials = [
        DenseFFNShard(unit, *shard_range(inter, 3, i), i == 0, model.spec.hidden_act)(normed)
        for i in range(3)
    ]
    torch.testing.assert_close(hidden + sum(partials), unit(hidden), rtol=1e-5, atol=1e-5)


def test_head_split_slices_give_the_whole_head(model_factory):
    assert head_split(10, 0.0, 2) == [(0, 10), (10, 10), (10, 10)]
    assert head_split(10, 0.5, 2) == [(0, 5), (5, 8), (8, 10)]
    assert head_split(10, 1.0, 3) == [(0, 0), (0, 4), (4, 7), (7, 10)]
    path, _ = model_factory("llama")
    _, model = load_model(path, "float32", torch.device("cpu"))
    normed = torch.randn(3, model.spec.hidden_size)
    slices = [HeadSlice(model.lm_head, *rows)(normed)
              for rows in head_split(model.spec.vocab_size, 0.4, 2)]
    assert [s.shape[1] for s in slices] != [model.spec.vocab_size, 0, 0]
    torch.testing.assert_close(torch.cat(slices, dim=1), model.lm_head(normed))
    # A worker that keeps only its slice frees the whole head; calling it is an error, never
    # partial logits.
    model.lm_head = RemovedHead(model.lm_head)
    assert model.lm_head.weight.numel() == 0
    with pytest.raises(RuntimeError, match="only a slice of the LM head"):
        model.compute_logits(torch.randn(2, model.spec.hidden_size))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="attention_workers must be an integer of at least 1"):
        AFDConfig(attention_workers=0)
    with pytest.raises(ValueError, match="micro_batches must be at most 16"):
        AFDConfig(micro_batches=17)
    with pytest.raises(ValueError, match="failure_detect_s"):
        AFDConfig(heartbeat_interval_s=2.0, failure_detect_s=1.0)
    with pytest.raises(ValueError, match="data_plane must be one of auto, torch, shm, got 'x'"):
        AFDConfig(data_plane="x")
    with pytest.raises(ValueError, match="data_plane 'shm' needs local workers"):
        AFDConfig(data_plane="shm", ray_address="auto")
    for share in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="ffn_head_share must be a number from 0 to 1"):
            AFDConfig(ffn_head_share=share)
    assert AFDConfig(attention_workers=3, ffn_workers=2).ffn_ranks() == [3, 4]


def test_trace_metric_and_error_brief():
    events = [{"cat": "send", "dur": 100}, {"cat": "wait", "dur": 25}, {"cat": "attn", "dur": 9}]
    assert hidden_transfer_fraction(events) == pytest.approx(0.75)
    assert hidden_transfer_fraction([]) is None
    error = RuntimeError("[/x/gloo/pair.cc:537] Read error [127.0.0.1]:1: Connection reset by "
                         "peer. This is typically caused by a remote worker hanging. GLHF!")
    assert brief(error) == "Read error [127.0.0.1]:1: Connection reset by peer"


@pytest.mark.processes
def test_pool_failure_names_the_killed_worker_before_its_peers():
    """A peer that exits (code 1) because a killed worker is gone is a consequence; the
    failure line names the worker killed by a signal, whatever the order of the pool."""
    import signal
    import subprocess
    import sys

    from tessera.afd.launcher import WorkerPool

    pool = WorkerPool.__new__(WorkerPool)
    pool.procs = {
        "attn0.g0": subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"]),
        "ffn1.g0": subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]),
    }
    pool.procs["attn0.g0"].wait()
    assert pool.exited() == "worker attn0 exited (code 1)"
    pool.procs["ffn1.g0"].send_signal(signal.SIGKILL)
    pool.procs["ffn1.g0"].wait()
    assert pool.exited() == f"worker ffn1 exited (code {-signal.SIGKILL})"


def test_workers_are_named_by_data_plane_rank():
    assert AFDConfig(attention_workers=2, ffn_workers=3).worker_name(1) == "attn1"
    assert AFDConfig(attention_workers=2, ffn_workers=3).worker_name(4) == "ffn2"


class _GlooLikeSend:
    """A send that, like gloo's, reports completion only once waited for."""

    def __init__(self) -> None:
        self.waited = False

    def is_completed(self) -> bool:
        return self.waited

    def wait(self, timeout: object = None) -> bool:
        self.waited = True
        return True


def test_ffn_worker_keeps_a_bounded_number_of_sends_in_flight():
    from collections import deque

    from tessera.afd.ffn_worker import MAX_SENDS, retire_sends

    in_flight: deque = deque()
    sends = []
    for _ in range(5 * MAX_SENDS):
        sends.append(_GlooLikeSend())
        in_flight.append((torch.zeros(1), sends[-1]))
        retire_sends(in_flight, timeout_s=1.0)
        assert len(in_flight) <= MAX_SENDS
    # The oldest were waited for, in order; the newest are still held (their tensors alive).
    assert all(s.waited for s in sends[:-MAX_SENDS])
    assert not any(s.waited for s in sends[-MAX_SENDS:])
    # Sends that report completion on their own (the shared-memory plane's) are just dropped.
    sends[-MAX_SENDS].waited = True
    retire_sends(in_flight, timeout_s=1.0)
    assert len(in_flight) == MAX_SENDS - 1


class _QueuedPlane:
    """A data plane whose requests have all queued up before the FFN worker looks; it ends
    the serve loop (as a failed transfer would) once they are answered."""

    rank = 2
    names = ["attn0", "attn1", "ffn0"]

    def __init__(self, requests: list) -> None:
        from collections import deque

        self.queue = deque(requests)  # (src, header [5], {tag: payload})
        self.payloads: dict = {}
        self.sent: list = []

    def _take(self, header: torch.Tensor) -> int:
        src, head, self.payloads = self.queue.popleft()
        header.copy_(head)
        return src

    def recv_any(self, header: torch.Tensor, tag: int) -> int:
        from tessera.afd.dataplane import TransferError

        if not self.queue:
            raise TransferError("no more requests")
        return self._take(header)

    def poll_any(self, header: torch.Tensor, tag: int) -> int | None:
        return self._take(header) if self.queue else None

    def recv(self, tensor: torch.Tensor, src: int, tag: int, deadline_s: float) -> None:
        tensor.copy_(self.payloads[tag])

    def isend(self, tensor: torch.Tensor, dst: int, tag: int) -> _GlooLikeSend:
        self.sent.append((dst, tag, tensor.clone()))
        send = _GlooLikeSend()
        send.waited = True
        return send


def _limits(model, shards, num_attention: int = 2, micro_batches: int = 2, max_tokens: int = 64):
    from tessera.afd.ffn_requests import RequestLimits
    from tessera.afd.ffn_shard import MoEShard

    moe = [s for s in shards if isinstance(s, MoEShard)]
    top_k = moe[0].unit.moe.top_k if moe else 0
    return RequestLimits(num_attention, micro_batches, max_tokens, max_tokens,
                         [top_k if isinstance(s, MoEShard) else 0 for s in shards],
                         model.spec.num_layers, moe[0].unit.moe.num_experts if moe else 0)


def test_ffn_worker_batches_queued_requests_of_a_layer(model_factory):
    from tessera.afd.dataplane import (
        IDS_TAG,
        PAYLOAD_TAG,
        RESULT_TAG,
        WEIGHTS_TAG,
        TransferError,
    )
    from tessera.afd.ffn_shard import ffn_shards
    from tessera.afd.ffn_worker import serve
    from tessera.afd.trace import Tracer

    path, _ = model_factory("mixtral")
    _, model = load_model(path, "float32", torch.device("cpu"))
    routers = list(model.units()[1::2])
    shards = ffn_shards(model, 1, 0)
    calls: list[tuple[int, int]] = []
    for layer_id, shard in enumerate(shards):
        shard.register_forward_hook(
            lambda _m, args, _out, layer_id=layer_id: calls.append((layer_id, args[0].shape[0]))
        )
    torch.manual_seed(0)
    # (src, layer, micro-batch, tokens), all queued: two attention ranks' requests for layer
    # 0, one for layer 1, and one more for layer 0 behind it, which still joins layer 0's batch.
    specs = [(0, 0, 0, 3), (1, 0, 1, 2), (0, 1, 1, 4), (1, 0, 0, 1)]
    requests, expected = [], []
    for src, layer_id, mb, num_tokens in specs:
        normed = torch.randn(num_tokens, model.spec.hidden_size)
        ids, weights = routers[layer_id].route(normed)
        header = torch.tensor([src, layer_id, mb, num_tokens, ids.shape[1]])
        requests.append((src, header, {PAYLOAD_TAG: normed, IDS_TAG: ids,
                                       WEIGHTS_TAG: weights.float()}))
        with torch.inference_mode():
            expected.append((src, RESULT_TAG + mb, shards[layer_id](normed, ids, weights)))
    calls.clear()
    plane = _QueuedPlane(requests)
    with pytest.raises(TransferError, match="no more requests"):
        serve(plane, shards, model.spec.num_layers, model.spec.hidden_size, torch.float32,
              torch.device("cpu"), 1.0, Tracer(False), _limits(model, shards))
    # One batch per layer over every request that had queued up, in first-arrival order.
    assert calls == [(0, 6), (1, 4)]
    # Each rank gets back its own rows, on its micro-batch's tag.
    got = sorted(plane.sent, key=lambda s: (s[0], s[1], s[2].shape[0]))
    want = sorted(expected, key=lambda s: (s[0], s[1], s[2].shape[0]))
    assert [(d, t) for d, t, _ in got] == [(d, t) for d, t, _ in want]
    for (_, _, result), (_, _, reference) in zip(got, want, strict=True):
        torch.testing.assert_close(result, reference, rtol=1e-6, atol=1e-6)


class _ScriptedLanes:
    """Lanes whose ``advance`` calls follow a script: "end" ends a step (token i), "block"
    blocks on the FFN workers, "run" does neither."""

    def __init__(self, script: list[str], events: list[str]) -> None:
        self.script, self.events, self.num_ended = list(script), events, 0

    def has_work(self) -> bool:
        return bool(self.script)

    def advance(self, before_block=None):
        what = self.script.pop(0)
        self.events.append(f"advance {what}")
        if what == "block":
            before_block()
        if what != "end":
            return []
        self.num_ended += 1
        return [StepOutput(deltas=[TokenDelta("r", self.num_ended - 1, self.num_ended, None,
                                              None)])]

    def stats(self) -> EngineStats:
        return EngineStats()


def test_attention_worker_reports_a_step_once_its_lane_has_moved_on():
    # A report wakes the front, which on a short host runs in the worker's place: it goes out
    # when the worker would block, or after the next advance, never in between a step's end
    # and its lane's next FFN request; none is lost, and the order is kept.
    from tessera.afd.attention_worker import run
    from tessera.afd.frames import FRONT_SENDER, FrameReader, FrameWriter, new_secret
    from tessera.afd.progress import Progress
    from tessera.messages.workers import WorkerInput

    secret = new_secret()
    writer = FrameWriter(secret, 0, FRONT_SENDER, 1 << 20)
    events: list[str] = []
    lanes = _ScriptedLanes(["end", "block", "end", "run", "end", "end"], events)
    ctx = zmq.Context()
    inputs, feed = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    inputs.bind("inproc://inputs")
    feed.connect("inproc://inputs")

    class _Front:
        def send(self, report: StepReport) -> None:
            events.append(f"report {[d.token_id for d in report.deltas]}")
            if not lanes.has_work():
                feed.send(writer.seal(Shutdown()))

    try:
        cfg = msgspec.json.decode(
            msgspec.json.encode({"role": "attention", "index": 0, "rank": 0, "generation": 0,
                                 "engine": {"model": "m"}, "afd": {}, "master_port": 1,
                                 "front_address": "ipc://x", "input_address": None,
                                 "parent_pid": 0}),
            type=WorkerConfig)
        reader = FrameReader(secret, WorkerInput, 0, "attn0", from_front=True)
        assert run(cfg, lanes, inputs, reader, _Front(), Tracer(False), Progress()) == 0
    finally:
        inputs.close(linger=0)
        feed.close(linger=0)
        ctx.term()
    assert events == [
        "advance end",
        "advance block", "report [1]",  # sent before blocking
        "advance end",
        "advance run", "report [2]",  # after the next advance
        "advance end",
        "advance end", "report [3]",
        "report [4]",  # no work left: sent at once
    ]
