"""The cluster's pure parts: KV events from the block manager, the router's index and its
policies; and the options that switch a cluster on."""

from __future__ import annotations

import random

import pytest

from tessera.cluster.kv_index import KVIndex
from tessera.cluster.router import EXPECT_S, Placement, Router
from tessera.config import ClusterConfig
from tessera.engine.block_manager import BlockManager
from tessera.engine.sequence import Sequence
from tessera.engine_args import engine_config
from tessera.kv.events import KVEventLog, KVEvents, event_key
from tessera.sampling_params import SamplingParams

BS = 4


def _seq(ids: list[int]) -> Sequence:
    return Sequence("r", ids, SamplingParams(max_tokens=4))


def test_replayed_events_always_match_the_cache():
    """Random admissions, completions, frees and resets: a reader applying every batch of
    events knows exactly the prefix keys the block manager holds."""
    rng = random.Random(0)
    bm = BlockManager(num_blocks=12, block_size=BS)
    index = KVIndex(1)
    live: list[Sequence] = []
    for step in range(400):
        op = rng.random()
        if op < 0.5 and len(live) < 3:
            prefix = rng.choice([[1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9], []])
            seq = _seq(prefix + [rng.randrange(50) for _ in range(rng.randrange(1, 10))])
            cached = bm.find_cached_blocks(seq)
            num_new = len(seq.token_ids) - len(cached) * BS
            if bm.can_allocate(seq, num_new, cached):
                bm.allocate(seq, num_new, cached)
                seq.num_computed_tokens = len(seq.token_ids)
                bm.register_computed(seq)
                live.append(seq)
        elif op < 0.9 and live:
            bm.free(live.pop(rng.randrange(len(live))))
        elif op < 0.92:
            bm.reset_prefix_cache()
        if step % 7 == 0 or step == 399:
            index.apply(0, bm.take_kv_events())
            held = {event_key(k) for k in bm.cached}
            assert index.num_blocks(0) == len(held)
            assert all(index.overlap(0, [k]) == 1 for k in held)


def test_an_event_log_keeps_each_key_s_latest_event():
    log = KVEventLog([1, 2])
    assert log.take() == KVEvents([1, 2], [], True)
    log.stored(3)
    log.removed(3)  # stored and evicted between takes: its latest event wins
    log.removed(1)
    log.stored(1)  # evicted and stored again: still there
    log.removed(2)
    assert log.take() == KVEvents([1], [3, 2], False)
    log.removed(1)
    log.stored(1)
    log.removed(1)  # the reader knew 1: it must hear it is gone
    assert log.take() == KVEvents([], [1], False)
    assert log.take() == KVEvents([], [], False)


def test_overlap_counts_leading_blocks_only():
    index = KVIndex(2)
    index.apply(0, KVEvents([10, 11, 13], [], True))
    assert index.overlap(0, [10, 11, 12, 13]) == 2
    assert index.overlap(1, [10, 11]) == 0
    index.apply(0, KVEvents([], [10], False))
    assert index.overlap(0, [10, 11]) == 0
    index.forget(0)
    assert index.num_blocks(0) == 0


def test_kv_policy_follows_the_prefix_until_load_outweighs_it():
    prompt = list(range(41))  # 11 blocks; 10 full before the last token

    def holding() -> Router:  # instance 1 reported the prompt's first 8 blocks
        router = Router(2, BS, "kv", overlap_weight=1.0, load_weight=1.0)
        router.index.apply(1, KVEvents(router.prompt_keys(prompt)[:8], [], True))
        return router

    assert holding().place(prompt, now_s=0.0) == Placement(1, 8, 3)
    # 100 prompt blocks queued on instance 1: computing all 11 on instance 0 is cheaper.
    router = holding()
    router.started("busy", Placement(1, 0, 100))
    assert router.place(prompt, now_s=0.0) == Placement(0, 0, 11)
    # Once that request decodes it weighs one block.
    router = holding()
    router.started("busy", Placement(1, 0, 100))
    router.first_token("busy")
    assert router.load(1) == 1
    assert router.place(prompt, now_s=0.0).instance == 1
    router.ended("busy")
    assert router.load(1) == 0
    # Down instances are never chosen, and what they held is forgotten.
    router.set_up(1, False)
    assert router.place(prompt, now_s=0.0) == Placement(0, 0, 11)
    router.set_up(0, False)
    with pytest.raises(ValueError, match="no instance"):
        router.place(prompt)


def test_a_burst_sharing_a_prefix_follows_its_first_request():
    """Before any instance reports, requests sharing a prefix go where the first went, until
    the prefill queued there outweighs the prefix."""
    router = Router(2, BS, "kv")
    prompt = list(range(40))
    placed = [router.place(prompt + [100 + i], now_s=0.0) for i in range(3)]
    for i, p in enumerate(placed):
        router.started(f"r{i}", p)
    assert [p.instance for p in placed] == [0, 0, 0]
    assert [p.num_prefill_blocks for p in placed] == [11, 1, 1]
    # Without a confirming event the expectation lapses.
    keys = router.prompt_keys(prompt + [100])
    assert router.index.overlap(0, keys, now_s=1.0) == 10
    assert router.index.overlap(0, keys, now_s=EXPECT_S + 1) == 0


def test_a_session_sticks_to_its_instance_when_nothing_is_known_cached():
    router = Router(2, BS, "kv", overlap_weight=1.0, load_weight=1.0)
    first = router.place(list(range(1000, 1040)), now_s=0.0, session="s1")
    router.started("a", first)
    # A later turn whose prefix no instance is known to hold (expectations lapsed) goes back
    # to the session's instance, though the other is idle...
    later = router.place(list(range(2000, 2040)), now_s=EXPECT_S + 1, session="s1")
    assert later.instance == first.instance
    # ...without a session it goes by load...
    assert router.place(list(range(3000, 3040)), now_s=EXPECT_S + 1).instance != first.instance
    # ...and with one, not when the session's instance is busier than the prompt is long.
    router.started("busy", Placement(first.instance, 0, 100))
    busy = router.place(list(range(4000, 4040)), now_s=EXPECT_S + 1, session="s1")
    assert busy.instance != first.instance
    # A known cached prefix outranks the session.
    router.index.apply(first.instance, KVEvents(router.prompt_keys(list(range(41)))[:8], [],
                                                True))
    router.ended("busy")
    router.ended("a")
    assert router.place(list(range(41)), now_s=0.0, session="s1").instance == first.instance


def test_round_robin_and_least_loaded():
    rr = Router(3, BS, "round_robin")
    rr.set_up(1, False)
    assert [rr.place([1]).instance for _ in range(4)] == [0, 2, 0, 2]
    ll = Router(2, BS, "least_loaded")
    ll.started("a", ll.place([1] * 8))
    assert ll.place([1]).instance == 1
    ll.first_token("a")
    ll.started("b", Placement(1, 0, 8))
    assert ll.place([1]).instance == 0  # one decoding against 8 blocks to prefill
    assert ll.num_placed == [1, 1]


def test_prompt_keys_are_the_engines_keys():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = _seq(list(range(11)))
    router = Router(1, BS)
    assert router.prompt_keys(seq.token_ids) == [event_key(bm.block_key(seq, i))
                                                 for i in range(2)]


def test_cluster_options():
    config = engine_config("m", data_parallel=2, router_policy="round_robin")
    assert config.cluster == ClusterConfig(data_parallel=2, router_policy="round_robin")
    assert engine_config("m", data_parallel=1).cluster is None
    with pytest.raises(ValueError, match="router_overlap_weight needs data_parallel or"):
        engine_config("m", router_overlap_weight=2.0)
    with pytest.raises(ValueError, match="router_policy must be one of"):
        engine_config("m", data_parallel=2, router_policy="random")
    with pytest.raises(ValueError, match="data_parallel must be at least 1"):
        engine_config("m", data_parallel=0)
    pd = engine_config("m", prefill_instances=1, decode_instances=2).cluster
    assert pd is not None and pd.roles == ["prefill", "decode", "decode"]
    with pytest.raises(ValueError, match="go together"):
        engine_config("m", prefill_instances=1)
    with pytest.raises(ValueError, match="not both"):
        engine_config("m", data_parallel=2, prefill_instances=1, decode_instances=1)
    with pytest.raises(ValueError, match="Transformerless"):
        engine_config("m", data_parallel=2, attention_workers=1, ffn_workers=1)
    with pytest.raises(ValueError, match="instances_ray_address needs data_parallel"):
        engine_config("m", instances_ray_address="auto")
    with pytest.raises(ValueError, match="prefill/decode instances on Ray are not supported"):
        engine_config("m", prefill_instances=1, decode_instances=1,
                      instances_ray_address="auto")
