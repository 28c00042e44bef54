"""The cluster front: an engine (``tessera.engine.protocol.Engine``) over several instances of
the model, each a process with its own scheduler and KV cache, behind a router.

``LLM`` and the serve engine core drive it exactly like ``LLMEngine``. It holds no model: it
validates and tokenizes prompts, asks the router (``router.py``) where each goes, and merges
what the instances report. Each instance's reports carry its KV events, which keep the
router's view of every instance's prefix cache current.

Prefill/decode pools: a request goes first to a prefill instance with ``max_tokens=1``. Its
first token is streamed as it comes; once the prefill instance reports it finished, its full
KV blocks are in the host KV tier every instance shares (saved before the step's report), and
the front hands the request to a decode instance as its prompt plus that token. The decode
instance loads those blocks from the tier (from its own device cache if it holds them) and
recomputes only the last partial block. What cannot move with its tokens runs whole on a
decode instance.

Failures stay with the instance they hit: an instance that exits, or has requests and reports
nothing for ``instance_stall_timeout_s``, is killed and started again (``instance_set.py``)
while the others serve on. Its requests are placed again (up to ``max_request_retries``
times): one with no tokens yet as it came, one with tokens continued from them on an instance
of the role it needs; the rest end with ``finish_reason="error"`` and the reason. Tokens
already delivered are never taken back.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import replace

import msgspec
import zmq

from tessera.cluster.instance_set import InstanceSet
from tessera.cluster.instances import InstanceProcess, decode_output
from tessera.cluster.router import Router
from tessera.cluster.tracked import Tracked, continuation, error_output, merged_output
from tessera.config import EngineConfig, RuntimeInfo
from tessera.engine.detokenizer import encode_prompt, load_tokenizer
from tessera.engine.front_checks import check_request
from tessera.kv.stats import sum_tier_stats
from tessera.messages.common import AbortRequests, AddRequest, Ready, StartupFailed
from tessera.messages.core import CoreStep
from tessera.model.loader import read_config
from tessera.model.spec import ModelConfigError, spec_from_config
from tessera.outputs import (
    EngineStats,
    InstanceStats,
    RequestOutput,
    StepOutput,
    TokenDelta,
    merge_spec_decode,
)
from tessera.sampling_params import SamplingParams

_POLL_MS = 100
_COUNTERS = ("num_prompt_tokens_total", "num_generation_tokens_total",
             "num_prefix_queried_tokens_total", "num_prefix_hit_tokens_total",
             "num_preemptions_total")


class ClusterEngine:
    """``data_parallel`` instances behind a router; same interface as ``LLMEngine``."""

    def __init__(self, config: EngineConfig) -> None:
        assert config.cluster is not None
        self.cluster = config.cluster
        try:
            self.spec = spec_from_config(read_config(config.model))
        except ModelConfigError as e:
            raise ValueError(str(e)) from e
        self.tokenizer = load_tokenizer(config.model)
        self.roles = config.cluster.roles
        self.requests: dict[str, Tracked] = {}
        self.num_instance_failures = 0
        self.num_retried_requests = 0
        """Requests placed again after their instance failed (with or without tokens)."""
        self.num_handoffs = 0
        """Requests a prefill instance started and a decode instance took over."""
        self._pending = StepOutput()
        self._totals = EngineStats()  # counters of instances that were replaced
        self.router = Router(len(self.roles), config.cache.block_size,
                             self.cluster.router_policy, self.cluster.router_overlap_weight,
                             self.cluster.router_load_weight)
        self._set = InstanceSet(config, self.cluster)
        ready = [inst.ready for inst in self._set.instances if inst.ready is not None]
        self.runtime = RuntimeInfo(
            num_kv_blocks=sum(r.num_kv_blocks for r in ready),
            max_model_len=min(r.max_model_len for r in ready),
            eos_token_ids=frozenset(self.spec.eos_token_ids),
            vocab_size=self.spec.vocab_size,
        )

    # ----------------------------------------------------------------- requests
    def tokenize(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    prompt_text: str | None = None) -> None:
        """Place a request with the router; ValueError for bad input."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else prompt_text
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        check_request(ids, params, self.spec.vocab_size, self.runtime.max_model_len)
        tracked = Tracked(-1, text, ids, params)
        if self._splits(ids, params):
            tracked.phase = "prefill"
            self._place(request_id, tracked, ids, replace(params, max_tokens=1), "prefill")
        else:
            tracked.phase = "decode" if self.cluster.prefill_instances else "both"
            self._place(request_id, tracked, ids, params, tracked.phase)
        self.requests[request_id] = tracked

    def _splits(self, ids: list[int], params: SamplingParams) -> bool:
        """Whether a request is prefilled on a prefill instance and handed to a decode one.
        What cannot move with its tokens runs whole on a decode instance: several
        completions, a grammar, prompt logprobs, penalties on the output so far."""
        return bool(self.cluster.prefill_instances and params.n == 1
                    and params.structured is None and params.prompt_logprobs is None
                    and not params.presence_penalty and not params.frequency_penalty
                    and (params.max_tokens is None or params.max_tokens > 1)
                    and len(ids) + 1 < self.runtime.max_model_len)

    def _place(self, request_id: str, tracked: Tracked, ids: list[int],
               params: SamplingParams, role: str) -> None:
        """Send the request to an instance of ``role`` (``both``: any); ValueError if none
        is up."""
        among = None if role == "both" else [i for i, r in enumerate(self.roles) if r == role]
        placement = self.router.place(ids, among=among)
        inst = self._set.instances[placement.instance]
        if not inst.request_ids:
            inst.last_seen_s = time.monotonic()  # its stall clock starts now
        inst.send(AddRequest(request_id, ids, params, tracked.prompt))
        inst.request_ids.add(request_id)
        tracked.instance, tracked.sent_params = placement.instance, params
        self.router.started(request_id, placement)

    def abort_request(self, request_id: str) -> bool:
        tracked = self.requests.pop(request_id, None)
        if tracked is None:
            return False
        self.router.ended(request_id)
        if self._set.leases is not None:
            self._set.leases.release(request_id)
        inst = self._set.instances[tracked.instance]
        inst.request_ids.discard(request_id)
        with contextlib.suppress(zmq.ZMQError):
            inst.send(AbortRequests([request_id]))
        return True

    def has_unfinished_requests(self) -> bool:
        # Outputs taken in by stats() between steps count: a step must still return them.
        return bool(self.requests or self._pending.deltas or self._pending.finished)

    @property
    def instance_pids(self) -> list[int]:
        """The process of each instance, by index (a restarted one has a new pid)."""
        return [inst.process.pid for inst in self._set.instances]

    def warm_up(self) -> None:
        """Instances warm up before reporting ready; nothing is left to do here."""

    def take_kv_events(self) -> None:
        """A cluster is not itself an instance of a larger one."""
        return None

    # ----------------------------------------------------------------- steps
    def step(self) -> list[RequestOutput]:
        return self.step_with_deltas().finished

    def step_with_deltas(self) -> StepOutput:
        """What the instances reported since the last call; waits until there is something
        (or a failure ended the unfinished requests)."""
        result, self._pending = self._pending, StepOutput()
        while True:
            timeout_ms = 0 if (result.deltas or result.finished or not self.requests) else _POLL_MS
            num_received = self._receive(result, timeout_ms)
            self._check_health(result)
            # Any report ends the call, tokens or not: a caller's stall watch (the serve
            # engine core's) then sees progress while instances prefill long prompts.
            if num_received or result.deltas or result.finished or not self.requests:
                return result

    def _receive(self, result: StepOutput, timeout_ms: int) -> int:
        """Handle every report that has arrived (waiting up to ``timeout_ms`` for one)."""
        live = self._set.live
        poller = zmq.Poller()
        for inst in live:
            poller.register(inst.output, zmq.POLLIN)
        ready = dict(poller.poll(timeout_ms)) if live else {}
        if not live:
            time.sleep(timeout_ms / 1000)
        num_received = 0
        for inst in live:
            # Handling a message can take the instance out (a failed restart): stop then.
            while inst.output in ready and not inst.closed and inst.output.poll(0):
                self._handle(inst, decode_output(inst.output.recv()), result)
                num_received += 1
        return num_received

    def _handle(self, inst: InstanceProcess, msg: object, result: StepOutput) -> None:
        now = time.monotonic()
        if isinstance(msg, Ready):
            inst.ready, inst.last_seen_s = msg, now
            self.router.set_up(inst.index, True)
            return
        if isinstance(msg, StartupFailed):
            self._fail(inst, f"{inst.name} failed to start: {msg.message}", result)
            return
        if not isinstance(msg, CoreStep) or msg.pid != inst.process.pid:
            return  # undecodable, or a dead start's
        inst.last_seen_s, inst.stats = now, msg.stats
        if msg.kv_events is not None:
            self.router.index.apply(inst.index, msg.kv_events)
        for d in msg.deltas:
            tracked = self.requests.get(d.request_id)
            if tracked is None or tracked.instance != inst.index:
                continue  # aborted, or moved away
            tracked.output_ids.setdefault(d.index, []).append(d.token_id)
            if d.logprobs is not None:
                tracked.logprobs.setdefault(d.index, []).append(d.logprobs)
            self.router.first_token(d.request_id)
            if tracked.phase == "decode" and self._set.leases is not None:
                self._set.leases.release(d.request_id)  # its blocks are loaded by now
            finish = d.finish_reason
            if tracked.phase == "prefill" and finish == "length":
                finish = None  # the first token of many: a decode instance goes on
            result.deltas.append(TokenDelta(d.request_id, d.index, d.token_id, d.logprobs,
                                            finish, d.prompt_logprobs, d.prompt_token_ranks))
        done = set()
        for out in msg.finished:
            tracked = self.requests.get(out.request_id)
            if tracked is None or tracked.instance != inst.index:
                continue
            done.add(out.request_id)
            if tracked.phase == "prefill" and out.outputs[0].finish_reason == "length":
                self._hand_off(out.request_id, tracked, inst, result)
                continue
            self._end(out.request_id, inst)
            result.finished.append(merged_output(out, tracked, self.tokenizer))
        for failed in msg.failed:
            tracked = self.requests.get(failed.request_id)
            if failed.request_id in done or tracked is None or tracked.instance != inst.index:
                continue
            self._end(failed.request_id, inst)
            result.finished.append(error_output(failed.request_id, tracked,
                                                failed.message, self.tokenizer))

    def _hand_off(self, request_id: str, tracked: Tracked, inst: InstanceProcess,
                  result: StepOutput) -> None:
        """A prefill instance computed the prompt and first token (its full blocks are in the
        shared host tier): a decode instance goes on from there."""
        inst.request_ids.discard(request_id)
        self.router.ended(request_id)
        self.num_handoffs += 1
        if self._set.leases is not None:
            self._set.leases.hold(request_id, tracked.prompt_token_ids
                                  + tracked.output_ids.get(0, []))
        why = self._continue(request_id, tracked)
        if why is not None:
            del self.requests[request_id]
            result.finished.append(error_output(
                request_id, tracked, f"no decode instance took the request: {why}",
                self.tokenizer))

    def _end(self, request_id: str, inst: InstanceProcess) -> None:
        if self._set.leases is not None:
            self._set.leases.release(request_id)
        self.requests.pop(request_id, None)
        inst.request_ids.discard(request_id)
        self.router.ended(request_id)

    # ----------------------------------------------------------------- failures
    def _check_health(self, result: StepOutput) -> None:
        for inst, reason in self._set.failures():
            self._fail(inst, reason, result)
        self._set.restart_due()

    def _fail(self, inst: InstanceProcess, reason: str, result: StepOutput) -> None:
        """Take ``inst`` out (it is started again), then place its requests again or end
        them."""
        if not self._set.take_out(inst):
            return
        print(f"tessera: {reason}; restarting it", file=sys.stderr)
        self.num_instance_failures += 1
        self.router.set_up(inst.index, False)
        self._totals = self._sum_counters([self._totals, inst.stats])
        inst.stats = EngineStats()
        orphans = sorted(inst.request_ids)
        inst.request_ids.clear()
        for request_id in orphans:
            self.router.ended(request_id)
            tracked = self.requests[request_id]
            again = self._retry(request_id, tracked)
            if again is not None:
                del self.requests[request_id]
                result.finished.append(error_output(
                    request_id, tracked, f"{reason} ({again})", self.tokenizer))

    def _retry(self, request_id: str, tracked: Tracked) -> str | None:
        """Place a failed instance's request again; None if placed, else why not."""
        if tracked.num_retries >= self.cluster.max_request_retries:
            return f"retried {tracked.num_retries} times"
        tracked.num_retries += 1
        self.num_retried_requests += 1
        if tracked.phase == "prefill" and not tracked.output_ids and tracked.sent_params:
            return self._try_place(request_id, tracked, tracked.prompt_token_ids,
                                   tracked.sent_params, "prefill")
        return self._continue(request_id, tracked)

    def _continue(self, request_id: str, tracked: Tracked) -> str | None:
        """Carry the request on from its tokens so far on another instance (a decode one in
        prefill/decode pools); None if placed, else why not."""
        again = continuation(tracked, self.runtime.max_model_len)
        if isinstance(again, str):
            return again
        ids, params = again
        tracked.phase = "both" if tracked.phase == "both" else "decode"
        tracked.num_resumed_tokens = len(ids) - len(tracked.prompt_token_ids)
        return self._try_place(request_id, tracked, ids, params, tracked.phase)

    def _try_place(self, request_id: str, tracked: Tracked, ids: list[int],
                   params: SamplingParams, role: str) -> str | None:
        try:
            self._place(request_id, tracked, ids, params, role)
        except ValueError as e:
            return str(e)
        return None

    # ----------------------------------------------------------------- stats, shutdown
    @staticmethod
    def _sum_counters(stats: list[EngineStats]) -> EngineStats:
        return EngineStats(**{name: sum(getattr(s, name) for s in stats) for name in _COUNTERS},
                           spec_decode=merge_spec_decode(s.spec_decode for s in stats))

    def stats(self) -> EngineStats:
        """Totals over the instances as of their latest reports, taken in without waiting
        (failures found meanwhile end their requests in the next step's output)."""
        self._receive(self._pending, 0)
        self._check_health(self._pending)
        per = [inst.stats for inst in self._set.instances]
        return msgspec.structs.replace(
            self._sum_counters([self._totals, *per]),
            num_running=sum(s.num_running for s in per),
            num_waiting=sum(s.num_waiting for s in per),
            num_free_blocks=sum(s.num_free_blocks for s in per),
            kv_cache_usage=sum(s.kv_cache_usage for s in per) / max(len(per), 1),
            kv_tiers=sum_tier_stats([s.kv_tiers for s in per]),
            instances=tuple(
                InstanceStats(i, self.roles[i], self.router.up[i], s.num_running, s.num_waiting,
                              s.kv_cache_usage, self.router.num_placed[i],
                              self.router.num_hit_tokens[i], self._set.num_restarts[i])
                for i, s in enumerate(per)),
        )

    def shutdown(self) -> None:
        """Stop every instance (each lands its KV tiers' writes first); safe to call twice."""
        if hasattr(self, "_set"):
            self._set.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.shutdown()
