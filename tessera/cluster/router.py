"""Which instance of a cluster takes a request. Pure Python (no torch), so the simulator and
the tests run the same placement.

Policies (``ClusterConfig.router_policy``):

- ``kv``: the instance of least cost, where cost = ``overlap_weight`` x the prompt blocks the
  instance would compute (those after the prefix it holds) + ``load_weight`` x its load: the
  prompt blocks it has yet to compute for the requests it holds, plus one per request it is
  decoding. The trade NVIDIA Dynamo's KV router makes: prefill saved by a cache hit against
  the work queued on the instance holding it. Ties go to fewer requests, then the lower index.
- ``least_loaded``: the instance of least load.
- ``round_robin``: the next instance that is up.

A request of a session (``place(..., session=...)``) for whose prompt no instance is known to
hold anything goes to the instance its session used last, unless that one's extra load costs
more than computing the whole prompt elsewhere: its earlier turns may be cached there without
the router knowing (events not yet in, expectations expired).

What an instance holds comes from its KV events, and from the prompts the router sent it that
it has not yet reported (expected for ``EXPECT_S``): requests of a burst that share a prefix
follow the first one before any instance has said what it caches. The router keeps its own
account of what it placed (``started``, ``grew``, ``ended``). Instances that are down are
never chosen.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from tessera.cluster.kv_index import KVIndex
from tessera.config import ROUTER_POLICIES
from tessera.kv.events import event_key
from tessera.kv.keys import ROOT_KEY, block_key

MAX_SESSIONS = 1 << 16
"""Sessions whose last instance is remembered (least recently placed forgotten first)."""
EXPECT_S = 30.0
"""How long a prompt sent to an instance counts as cached there without its KV events."""


@dataclass(frozen=True)
class Placement:
    instance: int
    num_hit_blocks: int
    """Leading prompt blocks the chosen instance holds, as far as the router knows."""
    num_prefill_blocks: int
    """Prompt blocks it is expected to compute."""


@dataclass
class _InFlight:
    instance: int
    num_prefill_blocks: int
    """Prompt blocks the instance computes for it (its load until the first token)."""
    decoding: bool = False


class Router:
    """Places requests on ``num_instances`` instances whose blocks hold ``block_size`` tokens."""

    def __init__(self, num_instances: int, block_size: int, policy: str = "kv",
                 overlap_weight: float = 1.0, load_weight: float = 0.5) -> None:
        if policy not in ROUTER_POLICIES:
            raise ValueError(f"router_policy must be one of {', '.join(ROUTER_POLICIES)}, "
                             f"got {policy!r}")
        self.num_instances = num_instances
        self.block_size = block_size
        self.policy = policy
        self.overlap_weight = overlap_weight
        self.load_weight = load_weight
        self.index = KVIndex(num_instances)
        self.up = [True] * num_instances
        self._in_flight: dict[str, _InFlight] = {}
        self._num_prefill_blocks = [0] * num_instances
        self._num_decoding = [0] * num_instances
        self._num_requests = [0] * num_instances
        self._next = 0
        self.num_placed = [0] * num_instances
        self._sessions: OrderedDict[str, int] = OrderedDict()
        self.num_hit_tokens = [0] * num_instances
        """Per instance, prompt tokens placed on it that it held (as far as the router knew)."""

    # ------------------------------------------------------------------ placement
    def prompt_keys(self, prompt_ids: list[int]) -> list[int]:
        """Event keys of the prompt blocks an engine can take from its cache (the full blocks
        before the last token, which is always computed), truncated like events."""
        keys, parent, bs = [], ROOT_KEY, self.block_size
        for start in range(0, (len(prompt_ids) - 1) // bs * bs, bs):
            parent = block_key(parent, prompt_ids[start:start + bs])
            keys.append(event_key(parent))
        return keys

    def load(self, instance: int) -> int:
        """Prompt blocks ``instance`` has yet to compute, plus one per request decoding."""
        return self._num_prefill_blocks[instance] + self._num_decoding[instance]

    def place(self, prompt_ids: list[int], now_s: float | None = None,
              among: Sequence[int] | None = None, session: str | None = None) -> Placement:
        """The instance for a new prompt, of ``among`` (default: all); ValueError when none of
        them is up. ``session`` names the conversation it belongs to (kv policy only)."""
        pool = range(self.num_instances) if among is None else among
        candidates = [i for i in pool if self.up[i]]
        if not candidates:
            raise ValueError("no instance of the cluster is up" if among is None else
                             "no instance of the pool this request needs is up")
        if self.policy == "round_robin":
            n = self.num_instances
            chosen = next(i % n for i in range(self._next, self._next + n)
                          if i % n in candidates)
            self._next = chosen + 1
            return Placement(chosen, 0, -(-len(prompt_ids) // self.block_size))
        num_prompt_blocks = -(-len(prompt_ids) // self.block_size)
        if self.policy == "least_loaded":
            chosen = min(candidates, key=lambda i: (self.load(i), self._num_requests[i], i))
            return Placement(chosen, 0, num_prompt_blocks)
        keys = self.prompt_keys(prompt_ids)
        now_s = time.monotonic() if now_s is None else now_s
        hits = {i: self.index.overlap(i, keys, now_s) for i in candidates}

        def cost(i: int) -> tuple[float, int, int]:
            return (self.overlap_weight * (num_prompt_blocks - hits[i])
                    + self.load_weight * self.load(i), self._num_requests[i], i)

        chosen = min(candidates, key=cost)
        if session is not None:
            chosen = self._affine(session, chosen, candidates, hits, num_prompt_blocks)
        self.index.expect(chosen, keys, now_s, now_s + EXPECT_S)
        return Placement(chosen, hits[chosen], num_prompt_blocks - hits[chosen])

    def _affine(self, session: str, chosen: int, candidates: list[int], hits: dict[int, int],
                num_prompt_blocks: int) -> int:
        last = self._sessions.pop(session, None)
        if (last is not None and last in candidates and not any(hits.values())
                and self.load_weight * (self.load(last) - self.load(chosen))
                <= self.overlap_weight * num_prompt_blocks):
            chosen = last
        self._sessions[session] = chosen
        if len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return chosen

    # ------------------------------------------------------------------ accounting
    def started(self, request_id: str, placement: Placement) -> None:
        """``request_id`` went where ``placement`` says."""
        i = placement.instance
        self._in_flight[request_id] = _InFlight(i, placement.num_prefill_blocks)
        self._num_prefill_blocks[i] += placement.num_prefill_blocks
        self._num_requests[i] += 1
        self.num_placed[i] += 1
        self.num_hit_tokens[i] += placement.num_hit_blocks * self.block_size

    def first_token(self, request_id: str) -> None:
        """The request's prompt is computed: it now decodes."""
        r = self._in_flight.get(request_id)
        if r is not None and not r.decoding:
            self._num_prefill_blocks[r.instance] -= r.num_prefill_blocks
            self._num_decoding[r.instance] += 1
            r.decoding = True

    def ended(self, request_id: str) -> None:
        r = self._in_flight.pop(request_id, None)
        if r is None:
            return
        if r.decoding:
            self._num_decoding[r.instance] -= 1
        else:
            self._num_prefill_blocks[r.instance] -= r.num_prefill_blocks
        self._num_requests[r.instance] -= 1

    def set_up(self, instance: int, up: bool) -> None:
        """Mark an instance up or down; one that goes down is forgotten by the index."""
        self.up[instance] = up
        if not up:
            self.index.forget(instance)
