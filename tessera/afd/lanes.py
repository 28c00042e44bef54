"""Lanes: an attention worker's M micro-batches, each stepping on its own.

Splitting one step's batch into micro-batches hides the FFN round trips of the layers, but not
what a step does outside them: building inputs, embedding, the LM head, sampling, scheduling.
While those run the FFN workers would sit idle. So each micro-batch is a *lane* with its own
scheduler (its share of the requests), and lanes do not wait for each other at step ends: lane
0 may be sampling while lane 1 is halfway through its layers, and lane 0's next step starts at
once. The driver resumes the lanes' step generators (``AttentionRunner.lane_step``) in turn;
each runs until it has sent an FFN request, so the FFN workers always have a lane's work queued.
A lane whose FFN result is not in yet is passed over while another lane can run; only when
every lane is waiting does the driver block, on the request sent first (the FFN workers answer
in arrival order). Strict turns would idle the attention worker on one lane's result while the
other lane's was ready, which happens each time the two lanes reach their LM heads together.

Invariants:
- All lanes share the worker's one block manager (one KV pool, one prefix cache). A lane only
  schedules, preempts and finishes its own sequences, and only between its own steps.
- An abort of a request in a lane with a step in flight waits for that step to end: the step
  is still writing KV into the request's blocks, which another lane could otherwise allocate.
- Lanes compose the engine's parts (its request table, KV pool and runner) with schedulers of
  their own; a lane's step gives the same tokens as ``LLMEngine.step`` on the same batch.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from tessera.afd.attention_runner import AttentionRunner, Pending
from tessera.afd.lane_policy import pick_lane
from tessera.afd.progress import Progress
from tessera.engine.llm_engine import LLMEngine, make_drafter
from tessera.engine.model_runner import SampledTokens
from tessera.engine.scheduler import Scheduler, SchedulerOutput
from tessera.outputs import EngineStats, StepOutput, merge_spec_decode
from tessera.sampling_params import SamplingParams


@dataclass
class Lane:
    """One micro-batch: its own scheduler over the worker's KV pool, and its step in flight."""

    index: int
    scheduler: Scheduler
    step: Generator[Pending, None, SampledTokens] | None = None
    """The step in flight, if any."""
    pending: Pending | None = None
    """What the step in flight waits for."""
    pending_order: int = 0
    """When it was sent, as a count of the worker's sends (the oldest is answered first)."""
    out: SchedulerOutput | None = None
    start_us: int = 0
    deferred_aborts: list[str] = field(default_factory=list)

    @property
    def num_unfinished(self) -> int:
        return len(self.scheduler.running) + len(self.scheduler.waiting)


class Lanes:
    """Drive ``num_lanes`` lanes over one attention worker's engine."""

    def __init__(self, engine: LLMEngine, runner: AttentionRunner, num_lanes: int,
                 progress: Progress | None = None) -> None:
        """Lanes over ``engine``'s request table and KV pool, stepping with ``runner`` (the
        engine's own, built for it). ``progress`` counts each resumed lane (a layer, or a
        step's end) for the heartbeat's stall detection."""
        self.requests = engine.requests
        self.block_manager = engine.block_manager
        self.kv_connector = engine.kv_connector
        self.runner = runner
        per_lane = engine.config.scheduler.per_lane(num_lanes)
        self.lanes = [Lane(m, Scheduler(per_lane, self.block_manager, self.kv_connector,
                                        make_drafter(per_lane, engine.runtime.max_model_len)))
                      for m in range(num_lanes)]
        self.lane_of: dict[str, int] = {}
        """Lane of every unfinished request."""
        self._num_sent = 0
        self.progress = progress or Progress()

    # ----------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        """Queue a request on the lane with the fewest unfinished sequences."""
        lane = self.lanes[pick_lane([ln.num_unfinished for ln in self.lanes])]
        self.requests.add(request_id, prompt_token_ids, params, lane.scheduler, prompt)
        self.lane_of[request_id] = lane.index

    def abort_request(self, request_id: str) -> None:
        """Abort now, or when the request's lane ends its step in flight (see invariants)."""
        index = self.lane_of.get(request_id)
        if index is None:
            return  # finished already, or unknown
        lane = self.lanes[index]
        if lane.step is not None:
            lane.deferred_aborts.append(request_id)
            return
        self.requests.abort(request_id, lane.scheduler)
        del self.lane_of[request_id]

    def has_work(self) -> bool:
        return any(ln.step is not None or ln.num_unfinished for ln in self.lanes)

    # ----------------------------------------------------------------- steps
    def advance(self, before_block: Callable[[], None] | None = None) -> list[StepOutput]:
        """Resume every lane that can go on (its FFN result is in, or it is idle with work, and
        then starts a step), in turn; if none can, call ``before_block`` and wait for the oldest
        request. Returns the outputs of the lane steps that ended. Run under
        ``torch.inference_mode()``; a failed transfer raises ``TransferError`` (the pool is
        then rebuilt)."""
        ended: list[StepOutput] = []
        resumed = False
        for lane in self.lanes:
            if lane.step is None:
                if not lane.num_unfinished:
                    continue
                out = self._schedule(lane)
                if out.is_empty:
                    continue  # waiting for KV blocks another lane holds
                lane.out, lane.start_us = out, self.runner.tracer.now_us()
                lane.step = self.runner.lane_step(out, lane.index)
            elif lane.pending is not None and not lane.pending.ready():
                continue  # another lane may go first
            resumed = True
            self._resume(lane, ended)
        if not resumed:
            waiting = [ln for ln in self.lanes if ln.step is not None]
            if waiting:  # every lane waits: block (in the step's own wait) on the oldest
                if before_block is not None:
                    before_block()
                self._resume(min(waiting, key=lambda ln: ln.pending_order), ended)
        return ended

    def _schedule(self, lane: Lane) -> SchedulerOutput:
        """The lane's next step, its KV loaded from the tiers (a sequence whose load fell
        short leaves the step and recomputes, as in ``LLMEngine.step_with_deltas``)."""
        out = lane.scheduler.schedule()
        if out.loads and self.kv_connector is not None:
            loaded = self.kv_connector.load(out.loads)
            if loaded.failed(out.loads):
                out = lane.scheduler.drop_failed_loads(out, loaded)
        return out

    def _resume(self, lane: Lane, ended: list[StepOutput]) -> None:
        assert lane.step is not None
        try:
            lane.pending = next(lane.step)
            self._num_sent += 1
            lane.pending_order = self._num_sent
        except StopIteration as done:
            lane.pending = None
            ended.append(self._end_step(lane, done.value))
        self.progress.tick()

    def _end_step(self, lane: Lane, result: SampledTokens) -> StepOutput:
        out = lane.out
        assert out is not None
        # The front refuses prompt logprobs.
        tokens, logprobs, num_accepted = result.tokens, result.logprobs, result.num_accepted
        lane.scheduler.update(out, tokens, num_accepted)
        if out.saves and self.kv_connector is not None:
            self.kv_connector.save(out.saves)  # before postprocess frees finished blocks
        step = self.requests.postprocess(out, tokens, logprobs, lane.scheduler,
                                         num_accepted=num_accepted)
        tracer = self.runner.tracer
        tracer.add("step", "step", lane.start_us, tracer.now_us(),
                   {"tokens": out.num_batched_tokens, "seqs": len(out.seqs),
                    "micro_batch": lane.index})
        lane.step = lane.out = None
        for finished in step.finished:
            self.lane_of.pop(finished.request_id, None)
        aborts, lane.deferred_aborts = lane.deferred_aborts, []
        for request_id in aborts:
            self.abort_request(request_id)
        return step

    # ----------------------------------------------------------------- stats
    def stats(self) -> EngineStats:
        schedulers, bm = [ln.scheduler for ln in self.lanes], self.block_manager
        return EngineStats(
            num_running=sum(len(s.running) for s in schedulers),
            num_waiting=sum(len(s.waiting) for s in schedulers),
            num_free_blocks=bm.num_free_blocks,
            kv_cache_usage=bm.usage,
            num_preemptions_total=sum(s.num_preemptions for s in schedulers),
            num_prompt_tokens_total=self.requests.num_prompt_tokens_total,
            num_generation_tokens_total=self.requests.num_generation_tokens_total,
            num_prefix_queried_tokens_total=sum(s.num_prefix_queried_tokens for s in schedulers),
            num_prefix_hit_tokens_total=sum(s.num_prefix_hit_tokens for s in schedulers),
            kv_tiers=() if self.kv_connector is None else self.kv_connector.stats(),
            spec_decode=merge_spec_decode(s.drafter.stats.snapshot() for s in schedulers
                                          if s.drafter is not None),
        )
