"""The KV tiers' pure parts: block keys, the block file format, the scheduler's loads, saves
and roll-back with a connector, and ``tessera kv``."""

from __future__ import annotations

import zlib

import pytest

from tessera.config import SchedulerConfig
from tessera.engine.block_manager import BlockManager
from tessera.engine.scheduler import Scheduler
from tessera.engine.sequence import Sequence
from tessera.kv import block_file
from tessera.kv.connector import LoadResult
from tessera.kv.keys import ROOT_KEY, block_key
from tessera.sampling_params import SamplingParams

FP = "0" * 32


def test_block_keys_chain_and_do_not_depend_on_the_process():
    a = block_key(ROOT_KEY, [1, 2, 3])
    assert a == block_key(ROOT_KEY, [1, 2, 3])
    assert a != block_key(ROOT_KEY, [1, 2, 4]) and a != block_key(1, [1, 2, 3])
    # A fixed value: keys name files other processes and restarts read.
    assert block_key(ROOT_KEY, [0]) == int.from_bytes(
        bytes.fromhex(_digest_of_zero_block()), "little")


def _digest_of_zero_block() -> str:
    import hashlib
    import struct

    return hashlib.blake2b(bytes(16) + struct.pack("<q", 0), digest_size=16).hexdigest()


def _file(payload: bytes = b"\x01\x02" * 50, key: int = 5, parent: int = 4,
          tokens: list[int] | None = None) -> bytes:
    tokens = [7, 8, 9] if tokens is None else tokens
    return block_file.encode_header(FP, key, parent, tokens, memoryview(payload)) + payload


def test_block_file_round_trip():
    data = _file()
    assert bytes(block_file.decode(data, FP, 5, 4, [7, 8, 9])) == b"\x01\x02" * 50
    assert block_file.read_header(data).token_ids == [7, 8, 9]


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:-1], "payload is"),
    (lambda d: d[:20], "truncated"),
    (lambda d: d[:-3] + bytes([d[-3] ^ 1]) + d[-2:], "checksum"),
    (lambda d: b"XXXX" + d[4:], "magic"),
    (lambda d: b"", "magic"),
    (lambda d: d[:8] + (2**31).to_bytes(4, "little") + d[12:], "oversized"),
    (lambda d: d[:12] + b"\xff" * 10 + d[22:], "unreadable header|another|payload"),
])
def test_block_file_damage_is_refused(damage, message):
    with pytest.raises(block_file.BlockFileError, match=message):
        block_file.decode(damage(_file()), FP, 5, 4, [7, 8, 9])


@pytest.mark.parametrize("fingerprint, key, parent, tokens, message", [
    ("1" * 32, 5, 4, [7, 8, 9], "another model"),
    (FP, 6, 4, [7, 8, 9], "another prefix"),
    (FP, 5, 3, [7, 8, 9], "another prefix"),
    (FP, 5, 4, [7, 8, 0], "another prefix"),
])
def test_block_file_of_another_block_is_refused(fingerprint, key, parent, tokens, message):
    with pytest.raises(block_file.BlockFileError, match=message):
        block_file.decode(_file(), fingerprint, key, parent, tokens)


def test_header_checksum_is_crc32_of_the_payload():
    assert block_file.read_header(_file(b"abc")).crc32 == zlib.crc32(b"abc")


class FakeConnector:
    """Holds the keys in ``stored``; records lookups."""

    def __init__(self, stored: set[int]) -> None:
        self.stored = stored
        self.committed: list[tuple[int, int]] = []

    def num_loadable_blocks(self, keys):
        n = 0
        for key in keys:
            if key not in self.stored:
                break
            n += 1
        return n

    def commit_lookup(self, keys, num_loading_blocks):
        self.committed.append((len(keys), num_loading_blocks))


def _seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, tokens, SamplingParams(max_tokens=4))


def test_scheduler_loads_what_the_connector_holds_then_saves_new_blocks():
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = list(range(18))  # 4 full blocks before the last token's block
    probe = _seq(tokens)
    stored = {bm.block_key(probe, i) for i in range(3)}  # the first 3 blocks are outside
    conn = FakeConnector(stored)
    sched = Scheduler(SchedulerConfig(), bm, conn)
    seq = _seq(tokens)
    sched.add(seq)
    out = sched.schedule()
    assert [len(x.keys) for x in out.loads] == [3] and out.load_seqs == [seq]
    assert out.num_new_tokens == [18 - 12] and seq.num_computed_tokens == 12
    assert out.loads[0].parent_key == ROOT_KEY
    assert out.loads[0].token_ids[1] == tokens[4:8]
    assert conn.committed == [(4, 3)]  # 4 candidate blocks after no device hit, 3 loaded
    sched.update(out, [100])
    # Block 3 (tokens 12..15) and block 4 (16, 17, 100 not yet computed: partial) -> only 3.
    assert [s.block_id for s in out.saves] == [seq.block_ids[3]]
    assert out.saves[0].parent_key == bm.block_key(seq, 2)


def test_failed_load_rolls_the_sequence_back_and_recomputes():
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = list(range(18))
    probe = _seq(tokens)
    conn = FakeConnector({bm.block_key(probe, i) for i in range(4)})
    sched = Scheduler(SchedulerConfig(), bm, conn)
    seq, other = _seq(tokens, "a"), _seq([50, 51, 52], "b")
    sched.add(seq)
    sched.add(other)
    out = sched.schedule()
    assert seq.num_computed_tokens == 16
    # Only 1 of the 4 blocks loaded: the sequence leaves this step, rolled back to block 1.
    step = sched.drop_failed_loads(out, LoadResult([1]))
    assert step.seqs == [other]
    assert seq.num_computed_tokens == 4 and seq.num_cached_tokens == 4
    assert len(seq.block_ids) == 5  # its blocks stay allocated for the recompute
    sched.update(step, [7])
    nxt = sched.schedule()  # recomputes tokens 4..17 of the rolled-back sequence
    assert seq in nxt.seqs and nxt.num_new_tokens[nxt.seqs.index(seq)] == 14
    assert not nxt.loads
    sched.update(nxt, [9] * len(nxt.seqs))
    assert [s.block_id for s in nxt.saves if s.token_ids[0] == 4] == [seq.block_ids[1]]
    # Nothing leaks: finishing frees every block.
    for s in (seq, other):
        sched.finish(s, "abort")
    assert bm.num_free_blocks == 16


def test_device_hits_come_first_and_are_not_loaded():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched0 = Scheduler(SchedulerConfig(), bm)
    first = _seq(list(range(10)), "first")
    sched0.add(first)
    out = sched0.schedule()
    sched0.update(out, [1])
    sched0.finish(first, "stop")  # blocks 0 and 1 stay cached on the device
    tokens = list(range(22))
    probe = _seq(tokens)
    conn = FakeConnector({bm.block_key(probe, i) for i in range(4)})
    sched = Scheduler(SchedulerConfig(), bm, conn)
    seq = _seq(tokens)
    sched.add(seq)
    out = sched.schedule()
    assert [len(x.keys) for x in out.loads] == [2]  # blocks 2 and 3; 0 and 1 are device hits
    assert out.loads[0].parent_key == bm.block_key(seq, 1)
    assert seq.num_computed_tokens == 16


def test_kv_cli_lists_checks_and_clears(tmp_path, capsys):
    from tessera.cli import main

    layout = tmp_path / ("a" * 32)
    (layout / "00").mkdir(parents=True)
    good = _file(key=0, parent=ROOT_KEY)
    (layout / "00" / ("00" * 16 + ".kvb")).write_bytes(good.replace(FP.encode(), b"a" * 32))
    (layout / "00" / ("00" + "11" * 15 + ".kvb")).write_bytes(b"junk")
    assert main(["kv", "ls", str(tmp_path)]) == 0
    assert f"{'a' * 32}         2" in capsys.readouterr().out
    assert main(["kv", "stats", str(tmp_path)]) == 0
    line = capsys.readouterr().out.splitlines()[1].split()
    assert line[1] == "2" and line[3] == "1" and line[4] == "3"  # 2 blocks, 1 bad, 3 tokens
    assert main(["kv", "clear", str(tmp_path)]) == 0
    assert "removed 2 block files" in capsys.readouterr().out
    assert not layout.exists()
    assert main(["kv", "ls", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("url, parts", [
    ("redis://kv.example:6380/2", ("kv.example", 6380, 2, False)),
    ("redis://kv-2", ("kv-2", 6379, 0, False)),
    ("redis://:pw@host/", ("host", 6379, 0, True)),
    ("redis://user:p@ss@host:1", ("host", 1, 0, True)),
])
def test_store_urls_are_parsed(url, parts):
    from tessera.kv.store_url import parse_store_url

    assert tuple(parse_store_url(url)) == parts


@pytest.mark.parametrize("url, message", [
    ("", "must be redis://"),
    ("localhost:6379", "must be redis://"),
    ("rediss://host", "must be redis://"),
    ("redis://", "names no host"),
    ("redis://host:0", "port must be"),
    ("redis://host:http", "port must be"),
    ("redis://host/one", "database number"),
    ("redis://host/0?ssl=1", "no query"),
])
def test_bad_store_urls_say_why(url, message):
    from tessera.config import CacheConfig

    with pytest.raises(ValueError, match=message):
        CacheConfig(kv_store=url)


def test_store_credentials_stay_out_of_messages_and_the_config_repr():
    from tessera.config import CacheConfig
    from tessera.kv.store_url import redact

    assert redact("redis://user:s3cret@host:1/0") == "redis://***@host:1/0"
    assert redact("redis://host:1/0") == "redis://host:1/0"
    with pytest.raises(ValueError) as e:
        CacheConfig(kv_store="redis://u:s3cret@host:x")
    assert "s3cret" not in str(e.value)
    assert "s3cret" not in repr(CacheConfig(kv_store="redis://u:s3cret@host:1"))
