"""The front: an engine (``tessera.engine.protocol.Engine``) over a pool of disaggregated workers.

``LLM`` and the serve engine core drive it exactly like ``LLMEngine``. It holds no
model: it validates and tokenizes prompts, sends each new request to the attention worker with
the fewest unfinished requests (then the most free KV blocks), and merges the workers' step
reports. Attention workers step independently; ``step`` returns whatever they reported since
the last call, blocking until something arrives.

Failures: a worker that exits, reports a failed transfer, sends no heartbeat for
``failure_detect_s``, or makes no progress for that long while it has work (its heartbeat
goes on but its main loop is stuck; see ``progress.py``) fails the pool. Every unfinished request then ends at once with
``finish_reason="error"`` (its tokens so far and the reason in ``CompletionOutput.error``),
the pool is killed (which frees all KV blocks) and a new generation is started on a fresh
port; new requests succeed once it is up.

Control messages travel as sealed frames (``frames.py``) under a secret drawn here per pool:
anything else reaching the front's socket is dropped.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from tessera.afd.frames import (
    FRONT_SENDER,
    FrameReader,
    FrameTooLarge,
    FrameWriter,
    SealedPush,
    frame_limit_bytes,
    new_secret,
)
from tessera.afd.launcher import Pool, PoolLink, WorkerStartupError
from tessera.afd.pools import bind_front, share_host_tier, start_pool
from tessera.afd.progress import ProgressWatch
from tessera.afd.trace import Span, chrome_events, write_trace
from tessera.config import EngineConfig, RuntimeInfo
from tessera.engine.detokenizer import encode_prompt, load_tokenizer
from tessera.engine.front_checks import check_request
from tessera.kv.stats import sum_tier_stats
from tessera.kv.store_process import StoreProcess
from tessera.messages.common import AbortRequests, AddRequest, Ready, Shutdown, StartupFailed
from tessera.messages.workers import FrontInput, Heartbeat, StepFailed, StepReport
from tessera.model.loader import read_config
from tessera.model.moe_spec import moe_spec_from_config
from tessera.model.spec import ModelConfigError, spec_from_config
from tessera.outputs import (
    CompletionOutput,
    EngineStats,
    RequestOutput,
    StepOutput,
    merge_spec_decode,
)
from tessera.sampling_params import SamplingParams

# How long a seen worker exit waits for a report that explains it (see ``_health``); a pool
# that fails to start has no requests waiting on it, so it can wait longer for the reason.
_LATE_REPORT_S = 0.5
_LATE_STARTUP_REPORT_S = 5.0


@dataclass
class _Placed:
    """A request as the front tracks it: the worker it went to, and its tokens so far."""

    worker: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    output_ids: dict[int, list[int]] = field(default_factory=dict)  # by completion index


class AFDEngine:
    """Attention/FFN disaggregated engine: same interface as ``LLMEngine``."""

    def __init__(self, config: EngineConfig) -> None:
        assert config.afd is not None
        self.config = config
        self.afd = config.afd
        try:
            self.spec = spec_from_config(read_config(config.model))
            moe = moe_spec_from_config(self.spec.raw or {})
        except ModelConfigError as e:
            raise ValueError(str(e)) from e
        num_ffn = self.afd.ffn_workers
        if moe is not None and num_ffn > moe.num_experts:
            raise ValueError(
                f"ffn_workers ({num_ffn}) exceeds the number of experts ({moe.num_experts})"
            )
        if (moe is None or not all(moe.moe_layers)) and num_ffn > self.spec.intermediate_size:
            raise ValueError(
                f"ffn_workers ({num_ffn}) exceeds the FFN intermediate size "
                f"({self.spec.intermediate_size})"
            )
        self.tokenizer = load_tokenizer(config.model)
        self.requests: dict[str, _Placed] = {}
        self.num_recoveries = 0
        self.last_failure: str | None = None
        self._ipc_dir = tempfile.mkdtemp(prefix="tessera-afd-")
        self._secret = new_secret()
        self._frame_limit_bytes = frame_limit_bytes(
            config.max_model_len or self.spec.max_position_embeddings)
        self._ctx = zmq.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.MAXMSGSIZE, self._frame_limit_bytes)
        self._reader = FrameReader(self._secret, FrontInput, -1, "front", from_front=False)
        self._trace_events: list[dict] = []
        self._generation = -1
        self._pool: Pool | None = None
        self._closed = False
        self._pending = StepOutput()  # taken in outside a step, returned by the next one
        self._pending_failure: str | None = None
        self._starting = self._broken = False
        self._totals = EngineStats()  # counters of earlier pool generations
        self._host_store: StoreProcess | None = None
        try:
            self._worker_config, self._host_store = share_host_tier(
                config, self.afd, self._ipc_dir)
            self._link = PoolLink(bind_front(self._pull, self.afd, self._ipc_dir),
                                  self._ipc_dir, self._secret, self._frame_limit_bytes)
            self._spawn_pool()
            try:
                self._await_pool()
            except WorkerStartupError as e:
                # A free port picked for us can be taken by someone else before rank 0
                # binds it; try once more on another. A port the user chose is not retried.
                if self.afd.master_port is not None or "already in use" not in str(e):
                    raise
                self._await_pool()  # respawns the broken pool on a fresh port
        except BaseException:
            self.shutdown()
            raise

    # ----------------------------------------------------------------- the pool
    def _spawn_pool(self) -> None:
        """Start the next generation's processes; ``_await_pool`` waits until they are up."""
        self._generation += 1
        self._reader.set_generation(self._generation)
        try:
            pool = start_pool(self._worker_config, self.afd, self._generation, self._link)
        except WorkerStartupError:
            self._broken = True  # the next _await_pool tries again and raises to its caller
            raise
        self._pool = pool
        self._pushes: dict[str, SealedPush] = {}
        for cfg in pool.attention:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            assert cfg.input_address is not None
            sock.connect(cfg.input_address)
            self._pushes[cfg.name] = SealedPush(sock, FrameWriter(
                self._secret, self._generation, FRONT_SENDER, self._frame_limit_bytes))
        self._ranks = {cfg.name: cfg.rank for cfg in pool.configs}
        self._stats = {name: EngineStats() for name in self._pushes}
        self._load = dict.fromkeys(self._pushes, 0)
        self._starting = True

    def _await_pool(self) -> None:
        """Wait until every worker of the pool is ready; a pool that failed to start before
        is spawned again first."""
        if self._broken:
            self._broken = False
            self._spawn_pool()
        if not self._starting:
            return
        self._starting = False
        try:
            self._wait_ready()
        except BaseException:
            self._broken = True
            raise

    def _wait_ready(self) -> None:
        pool = self._pool
        assert pool is not None
        pending = set(self._ranks)
        limits: list[Ready] = []
        deadline = time.monotonic() + self.afd.startup_timeout_s
        exited: str | None = None
        exited_s = 0.0
        while pending:
            # A worker that failed says why before it exits: once one has exited, what
            # arrives soon after is still read, so its reason wins over its code.
            now = time.monotonic()
            if (exited is not None and now > exited_s + _LATE_STARTUP_REPORT_S) or now > deadline:
                pool.kill()
                raise WorkerStartupError(
                    exited or f"workers {sorted(pending)} did not start within "
                    f"{self.afd.startup_timeout_s:g} s"
                )
            if self._pull.poll(100):
                msg = self._recv()
                if msg is None or msg.worker not in self._ranks:
                    continue  # dropped, or an older generation's
                if isinstance(msg, StartupFailed):
                    pool.kill()
                    raise WorkerStartupError(f"{msg.worker.split('.')[0]}: {msg.message}")
                if isinstance(msg, Ready):
                    pending.discard(msg.worker)
                    if msg.worker in self._pushes:
                        limits.append(msg)
            elif exited is None:
                exited, exited_s = pool.exited(), now
        now = time.monotonic()
        self._last_seen = dict.fromkeys(self._ranks, now)
        self._progress = ProgressWatch(list(self._ranks), self.afd.failure_detect_s, now)
        self.runtime = RuntimeInfo(
            num_kv_blocks=sum(r.num_kv_blocks for r in limits),
            max_model_len=min(r.max_model_len for r in limits),
            eos_token_ids=frozenset(self.spec.eos_token_ids),
            vocab_size=self.spec.vocab_size,
        )

    def _health(self, result: StepOutput) -> str | None:
        """Why the pool has failed, or None while it is healthy."""
        assert self._pool is not None
        if self._host_store is not None:
            self._host_store.check()  # workers reattach to a restarted store by themselves
        exited = self._pool.exited()
        if exited is not None:
            # A worker whose peer failed reports it (StepFailed naming the peer), then exits;
            # its exit can be seen before its report arrives. Wait a moment for the report,
            # so the failure names the cause rather than the consequence.
            return self._late_report(result) or exited
        now = time.monotonic()
        for name, seen in self._last_seen.items():
            if now - seen > self.afd.failure_detect_s:
                return f"worker {name.split('.')[0]} sent no heartbeat for {now - seen:.1f} s"
        for name in self._ranks:
            stalled_s = self._progress.stalled_s(name, self._load.get(name, 0) > 0, now)
            if stalled_s is not None:
                return (f"worker {name.split('.')[0]} made no progress for {stalled_s:.1f} s "
                        "with work pending (its main loop is stuck)")
        return None

    def _recv(self) -> Any | None:
        """The next message on the front's socket (there must be one), or None if it is
        dropped: not a sealed frame of this pool (logged by the reader)."""
        return self._reader.open(self._pull.recv())

    def _late_report(self, result: StepOutput) -> str | None:
        """A failure some worker reports within ``_LATE_REPORT_S``, if any."""
        deadline = time.monotonic() + _LATE_REPORT_S
        while (left_s := deadline - time.monotonic()) > 0:
            if not self._pull.poll(int(left_s * 1000) + 1):
                break
            failure = self._handle(self._recv(), result)
            if failure is not None:
                return failure
        return None

    def _recover(self, reason: str, result: StepOutput) -> StepOutput:
        """End every unfinished request with an error at once and start a new pool (the
        next request waits for it to be up)."""
        self.num_recoveries += 1
        self.last_failure = reason
        print(f"tessera: worker pool failed ({reason}); restarting it", file=sys.stderr)
        assert self._pool is not None
        self._pool.kill()
        self._totals = self._sum_stats()
        self._stats = {name: EngineStats() for name in self._stats}
        message = f"worker pool failed: {reason}"
        for request_id, req in self.requests.items():
            result.finished.append(self._error_output(request_id, req, message))
        self.requests.clear()
        if self.afd.ray_address is not None:
            # Placing Ray actors takes as long as the cluster needs (bounded by the
            # placement and startup timeouts): leave it to the next request rather than
            # hold the failed requests' errors, and this engine, until then.
            self._broken = True
            return result
        with contextlib.suppress(WorkerStartupError):  # reported to the next request
            self._spawn_pool()
        return result

    def _check_idle_pool(self) -> None:
        """Before new work on an idle pool: restart it if a worker died meanwhile (no request
        is lost, so the restart is silent but for a line on stderr)."""
        self._take_in()
        failure, self._pending_failure = self._pending_failure, None
        failure = failure or self._health(self._pending)
        if failure is not None:
            self._recover(failure, self._pending)
            self._await_pool()

    def _error_output(self, request_id: str, req: _Placed, message: str) -> RequestOutput:
        outputs = []
        for index in range(req.params.n):
            ids = req.output_ids.get(index, [])
            text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else ""
            outputs.append(CompletionOutput(index, text, ids, "error", error=message))
        return RequestOutput(request_id, req.prompt, req.prompt_token_ids, outputs, True)

    # ----------------------------------------------------------------- requests
    def tokenize(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    prompt_text: str | None = None) -> None:
        """Queue a request on the least loaded attention worker; ValueError for bad input."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.prompt_logprobs is not None:
            # The workers' head may be split over FFN workers by vocabulary, and their step
            # results carry no prompt logprobs back: refused before any work.
            raise ValueError("prompt_logprobs is not supported by the Transformerless "
                             "(disaggregated) pool")
        text = prompt if isinstance(prompt, str) else prompt_text
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        self._await_pool()
        if not self.requests:
            self._check_idle_pool()
        check_request(ids, params, self.spec.vocab_size, self.runtime.max_model_len)
        worker = min(self._load, key=lambda w: (self._load[w], -self._stats[w].num_free_blocks))
        try:
            self._pushes[worker].send(AddRequest(request_id, ids, params, text))
        except FrameTooLarge as e:
            raise ValueError(f"request too large for the worker pool: {e}") from e
        if self._load[worker] == 0:
            self._progress.progressed(worker, time.monotonic())  # its clock starts now
        self._load[worker] += 1
        self.requests[request_id] = _Placed(worker, text, ids, params)

    def abort_request(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self._load[req.worker] -= 1
        self._pushes[req.worker].send(AbortRequests([request_id]))
        return True

    def has_unfinished_requests(self) -> bool:
        # Outputs taken in by stats() between steps count: the last one must still be
        # returned by a step.
        return bool(self.requests or self._pending.deltas or self._pending.finished)

    def warm_up(self) -> None:
        """Workers warm up before reporting ready; nothing is left to do here."""

    def take_kv_events(self) -> None:
        """Not followed across attention workers: a router places by load alone."""
        return None

    # ----------------------------------------------------------------- steps
    def step(self) -> list[RequestOutput]:
        return self.step_with_deltas().finished

    def _take_in(self) -> None:
        """Handle what has arrived, without waiting; tokens and failures are kept for the
        next step."""
        if self._starting or self._broken:
            return  # Ready messages are for _wait_ready
        while self._pull.poll(0):
            failure = self._handle(self._recv(), self._pending)
            self._pending_failure = self._pending_failure or failure

    def step_with_deltas(self) -> StepOutput:
        """What the workers reported since the last call; waits until there is something
        (or a failure ended the unfinished requests)."""
        result, self._pending = self._pending, StepOutput()
        if self._starting or self._broken:
            return result  # a new pool is coming up; no request can be on it yet
        poll_ms = int(self.afd.heartbeat_interval_s * 1000)
        while True:
            failure, self._pending_failure = self._pending_failure, None
            timeout = 0 if (result.deltas or result.finished or not self.requests) else poll_ms
            while self._pull.poll(timeout):
                timeout = 0
                failure = self._handle(self._recv(), result) or failure
            failure = failure or self._health(result)
            if failure is not None:
                return self._recover(failure, result)
            if result.deltas or result.finished or not self.requests:
                return result

    def _handle(self, msg: Any | None, result: StepOutput) -> str | None:
        """Apply one message of a running pool; returns a failure reason, if it reports one."""
        if msg is None or msg.worker not in self._ranks:
            return None  # dropped, or an older generation's
        now = time.monotonic()
        self._last_seen[msg.worker] = now
        if isinstance(msg, Heartbeat):
            self._progress.beat(msg.worker, msg.progress, msg.state,
                                self._load.get(msg.worker, 0) > 0, now)
        if isinstance(msg, StepReport):
            self._progress.progressed(msg.worker, now)
        if isinstance(msg, Heartbeat | StepReport):
            self._add_spans(msg.worker, msg.spans)
        if isinstance(msg, StepFailed):
            return f"{msg.worker.split('.')[0]}: {msg.message}"
        if not isinstance(msg, StepReport):
            return None
        self._stats[msg.worker] = msg.stats
        for d in msg.deltas:
            req = self.requests.get(d.request_id)
            if req is None:
                continue  # aborted
            req.output_ids.setdefault(d.index, []).append(d.token_id)
            result.deltas.append(d)
        for out in msg.finished:
            if self.requests.pop(out.request_id, None) is not None:
                self._load[msg.worker] -= 1
                result.finished.append(out)
        return None

    # ----------------------------------------------------------------- stats, trace
    def _sum_stats(self) -> EngineStats:
        """Counters summed over this generation's workers and the generations before."""
        base = self._totals
        counters = ("num_prompt_tokens_total", "num_generation_tokens_total",
                    "num_prefix_queried_tokens_total", "num_prefix_hit_tokens_total",
                    "num_preemptions_total")
        return EngineStats(**{
            name: getattr(base, name) + sum(getattr(s, name) for s in self._stats.values())
            for name in counters
        }, spec_decode=merge_spec_decode(
            s.spec_decode for s in (base, *self._stats.values())))

    def stats(self) -> EngineStats:
        """Totals over the workers as of their latest reports (taken in without waiting);
        an abort shows once its worker has handled it."""
        self._take_in()
        per = list(self._stats.values())
        return msgspec.structs.replace(
            self._sum_stats(),
            num_running=sum(s.num_running for s in per),
            num_waiting=sum(s.num_waiting for s in per),
            num_free_blocks=sum(s.num_free_blocks for s in per),
            kv_cache_usage=sum(s.kv_cache_usage for s in per) / max(len(per), 1),
            kv_tiers=sum_tier_stats([s.kv_tiers for s in per]),
        )

    def _add_spans(self, worker: str, spans: list[Span]) -> None:
        if spans:
            name = worker.split(".")[0]
            self._trace_events += chrome_events(name, self._ranks[worker], spans)

    # ----------------------------------------------------------------- shutdown
    def shutdown(self) -> None:
        """Stop every worker, write the trace; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            for push in self._pushes.values():
                with contextlib.suppress(zmq.ZMQError):
                    push.send(Shutdown(), zmq.NOBLOCK)
            if self.afd.trace_path is not None:
                # FFN workers ship spans with heartbeats: wait for one sent after this point
                # from each (an earlier one may predate their last spans).
                quiet = {name for name in self._ranks if name not in self._pushes}
                since_s = time.time()
                # Generous: a loaded host delays beats, and a trace without a worker is wrong.
                end = time.monotonic() + 10 * self.afd.heartbeat_interval_s + 2.0
                while quiet and time.monotonic() < end:
                    if not self._pull.poll(50):
                        continue
                    msg = self._recv()
                    if isinstance(msg, Heartbeat | StepReport) and msg.worker in self._ranks:
                        self._add_spans(msg.worker, msg.spans)
                        if isinstance(msg, Heartbeat) and msg.sent_s >= since_s:
                            quiet.discard(msg.worker)
            self._pool.kill()
        if self._host_store is not None:
            self._host_store.close()
        if self.afd.trace_path is not None:
            write_trace(self.afd.trace_path, self._trace_events)
        self._ctx.destroy(linger=0)
        shutil.rmtree(self._ipc_dir, ignore_errors=True)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.shutdown()
