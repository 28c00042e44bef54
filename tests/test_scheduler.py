"""Scheduler and block manager driven directly (pure Python, no model)."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.config import SchedulerConfig
from tessera.engine.block_manager import BlockManager
from tessera.engine.scheduler import Scheduler
from tessera.engine.sequence import Sequence, SequenceStatus
from tessera.sampling_params import SamplingParams

P = SamplingParams(max_tokens=4)


def make(num_blocks=8, block_size=4, budget=16, max_seqs=8, chunked=True, prefix=True):
    bm = BlockManager(num_blocks, block_size, prefix)
    sched = Scheduler(SchedulerConfig(max_seqs, budget, chunked), bm)
    return sched, bm


def run_step(sched, token=7):
    out = sched.schedule()
    tokens = [
        token if s.num_computed_tokens + n == s.num_tokens else None
        for s, n in zip(out.seqs, out.num_new_tokens, strict=True)
    ]
    sched.update(out, tokens)
    return out


def check_invariants(sched, bm):
    in_use = [b for s in sched.running for b in s.block_ids]
    counts: dict[int, int] = {}
    for b in in_use:
        counts[b] = counts.get(b, 0) + 1
    for b in range(bm.num_blocks):
        assert bm.ref_counts[b] == counts.get(b, 0)
        assert (b in bm.free_queue) == (counts.get(b, 0) == 0)
    for s in sched.waiting:
        assert not s.block_ids and s.status is SequenceStatus.WAITING
    for s in sched.running:
        assert len(s.block_ids) * bm.block_size >= s.num_computed_tokens
    for key, b in bm.cached.items():
        assert bm.block_keys[b] == key


def test_block_manager_allocate_free_is_exact():
    bm = BlockManager(4, 4)
    seq = Sequence("a", list(range(10)), P)
    assert bm.can_allocate(seq, 10)
    bm.allocate(seq, 10)
    assert len(seq.block_ids) == 3 and bm.num_free_blocks == 1
    seq.num_computed_tokens = 10
    bm.register_computed(seq)
    assert len(bm.cached) == 2  # two full blocks published, the partial one not
    bm.free(seq)
    assert bm.num_free_blocks == 4 and all(c == 0 for c in bm.ref_counts)
    # The unhashed (partial) block is recycled before cached ones.
    assert next(iter(bm.free_queue)) not in bm.cached.values()


def test_prefix_hit_shares_blocks_and_leaves_last_token():
    bm = BlockManager(8, 4)
    a = Sequence("a", list(range(12)), P)
    bm.allocate(a, 12)
    a.num_computed_tokens = 12
    bm.register_computed(a)
    b = Sequence("b", list(range(12)), P)
    hits = bm.find_cached_blocks(b)
    assert hits == a.block_ids[:2]  # all 12 cached, but the last token must be recomputed
    bm.allocate(b, 4, hits)
    assert b.num_computed_tokens == 8 and bm.ref_counts[a.block_ids[0]] == 2
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_eviction_drops_stale_cache_entries():
    bm = BlockManager(2, 4)
    a = Sequence("a", list(range(8)), P)
    bm.allocate(a, 8)
    a.num_computed_tokens = 8
    bm.register_computed(a)
    bm.free(a)
    assert len(bm.cached) == 2
    c = Sequence("c", [99] * 8, P)
    assert bm.find_cached_blocks(c) == []
    bm.allocate(c, 8)  # must evict both cached blocks
    assert bm.cached == {}


def test_scheduler_mixes_decode_and_chunked_prefill():
    sched, bm = make(num_blocks=16, block_size=4, budget=8)
    a = Sequence("a", list(range(3)), P)
    sched.add(a)
    run_step(sched)  # a prefilled, sampled one token
    b = Sequence("b", list(range(100, 120)), P)
    sched.add(b)
    out = sched.schedule()
    assert out.seqs == [a, b] and out.num_new_tokens == [1, 7]  # decode + prefill chunk


def test_chunking_off_waits_for_a_whole_prompt():
    sched, _ = make(num_blocks=16, block_size=4, budget=8, chunked=False)
    sched.add(Sequence("a", list(range(3)), P))
    sched.add(Sequence("b", list(range(6)), P))
    out = sched.schedule()
    assert out.num_new_tokens == [3]  # b (6 tokens) does not fit in the 5 left


def test_preemption_frees_and_requeues_latest():
    sched, bm = make(num_blocks=3, block_size=4, budget=16)
    a = Sequence("a", list(range(4)), P)
    b = Sequence("b", list(range(10, 18)), P)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a: 1 block + b: 2 blocks; both sampled a token
    out = sched.schedule()  # both need a new block; only b can be preempted
    assert b in out.preempted and sched.waiting[0] is b and not b.block_ids
    assert out.seqs == [a]
    check_invariants(sched, bm)


def test_abort_frees_blocks():
    sched, bm = make()
    a = Sequence("a", list(range(9)), P)
    sched.add(a)
    run_step(sched)
    sched.finish(a, "abort")
    assert a.finish_reason == "abort" and bm.num_free_blocks == bm.num_blocks


ops = st.lists(
    st.tuples(st.sampled_from(["add", "step", "step", "step", "abort", "finish"]),
              st.integers(1, 40), st.integers(0, 3)),
    min_size=1,
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(11, 24), budget=st.integers(1, 24),
       chunked=st.booleans(), prefix=st.booleans())
def test_no_leaks_under_any_mix(ops, num_blocks, budget, chunked, prefix):
    # Any sequence fits alone: at most 40 prompt + 4 output tokens = 11 blocks of 4.
    sched, bm = make(num_blocks=num_blocks, block_size=4, budget=budget if chunked else 48,
                     chunked=chunked, prefix=prefix)
    live: list[Sequence] = []
    for op, length, pick in ops:
        if op == "add":
            # Few distinct token patterns, so prompts share prefixes and hit the cache.
            seq = Sequence("r", [(i * (pick + 1)) % 5 for i in range(length)], P)
            sched.add(seq)
            live.append(seq)
        elif op == "step":
            run_step(sched, token=pick)
            for s in list(sched.running):
                if s.num_output_tokens >= 4:
                    sched.finish(s, "length")
        elif live:
            seq = live[pick % len(live)]
            sched.finish(seq, "abort" if op == "abort" else "stop")
        check_invariants(sched, bm)
    # Drain: everything still queued must finish without a hang.
    for _ in range(10_000):
        if not sched.has_unfinished():
            break
        run_step(sched)
        for s in list(sched.running):
            if s.num_output_tokens >= 4:
                sched.finish(s, "length")
        check_invariants(sched, bm)
    assert not sched.has_unfinished()
    assert bm.num_free_blocks == num_blocks and not any(bm.ref_counts)


@pytest.mark.processes
def test_scheduler_imports_no_torch():
    import subprocess

    code = (
        "import sys; import tessera.engine.scheduler, tessera.engine.block_manager; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_prefix_stats_count_a_request_once_even_if_preempted_mid_prompt():
    sched, bm = make(num_blocks=4, block_size=4, budget=4)
    a = Sequence("a", list(range(8)), P)
    sched.add(a)
    run_step(sched)  # a: first chunk of 4 prompt tokens
    sched._preempt(a)  # out of blocks before its first token
    assert a.num_output_tokens == 0 and a.num_preemptions == 1
    while sched.has_unfinished() and a.num_output_tokens == 0:
        run_step(sched)
    assert sched.num_prefix_queried_tokens == 8  # not 16: counted at first admission only
    assert sched.num_prefix_hit_tokens == 0
