"""Sealed control frames: only frames sealed with the pool's secret, for the reader's generation,
from the right side and in order, are opened; everything else is dropped and logged once per
kind. Oversized reports are split, never truncated."""

from __future__ import annotations

import logging

import msgspec
import pytest

from tessera.afd.attention_worker import send_report
from tessera.afd.frames import (
    FRONT_SENDER,
    MAIN_CHANNEL,
    PREFIX_BYTES,
    FrameReader,
    FrameTooLarge,
    FrameWriter,
    SealedPush,
    new_secret,
    read_secret,
    split_message,
    worker_sender,
)
from tessera.afd.trace import Span
from tessera.messages.common import Shutdown
from tessera.messages.workers import FrontInput, Heartbeat, StepFailed, StepReport, WorkerInput
from tessera.outputs import CompletionOutput, EngineStats, RequestOutput, TokenDelta

LIMIT = 1 << 16


def _front_reader(secret: bytes, generation: int = 3) -> FrameReader:
    return FrameReader(secret, FrontInput, generation, "front", from_front=False)


def test_a_sealed_frame_opens_once_and_only_for_its_generation_and_side():
    secret = new_secret()
    writer = FrameWriter(secret, 3, worker_sender(1, MAIN_CHANNEL), LIMIT)
    reader = _front_reader(secret)
    frame = writer.seal(StepFailed("ffn0.g3", "x"))
    assert reader.open(frame) == StepFailed("ffn0.g3", "x")
    assert reader.open(frame) is None  # a replay
    assert reader.drops.counts == {"replayed": 1}
    # Another generation's frames are dropped without a word (expected after a restart).
    assert reader.open(FrameWriter(secret, 2, 2, LIMIT).seal(StepFailed("a", "b"))) is None
    assert reader.drops.counts == {"replayed": 1}
    # The front's frames go to attention workers, not to the front; and the reverse.
    front_frame = FrameWriter(secret, 3, FRONT_SENDER, LIMIT).seal(Shutdown())
    assert reader.open(front_frame) is None
    worker_input = FrameReader(secret, WorkerInput, 3, "attn0", from_front=True)
    assert worker_input.open(front_frame) == Shutdown()
    assert worker_input.open(writer.seal(Shutdown())) is None
    # After a restart the reader takes the new generation's frames, from sequence 1 again.
    reader.set_generation(4)
    assert reader.open(FrameWriter(secret, 4, 2, LIMIT).seal(StepFailed("a", "b"))) is not None


def test_junk_is_dropped_and_logged_once_per_kind(caplog):
    secret = new_secret()
    reader = _front_reader(secret)
    good = FrameWriter(secret, 3, 0, LIMIT).seal(StepFailed("attn0.g3", "x"))
    forged = bytearray(good)
    forged[-1] ^= 1
    junk = {
        "truncated": [b"", b"x" * (PREFIX_BYTES - 1)],
        "bad MAC (forged, or not from this pool)": [
            bytes(forged),
            msgspec.msgpack.encode(StepFailed("attn0.g3", "x")) * 3,  # valid msgpack, no MAC
            FrameWriter(new_secret(), 3, 0, LIMIT).seal(StepFailed("attn0.g3", "x")),
            b"\x00" * 200,
        ],
    }
    caplog.set_level(logging.WARNING, logger="tessera.afd.frames")
    for _ in range(50):
        for frames in junk.values():
            for frame in frames:
                assert reader.open(frame) is None
    assert reader.drops.counts == {kind: 50 * len(frames) for kind, frames in junk.items()}
    assert len(caplog.records) == len(junk), [r.getMessage() for r in caplog.records]
    # Sealed by a holder of the secret but not a message of this socket's union.
    writer = FrameWriter(secret, 3, 5, LIMIT)
    assert reader.open(writer.seal({"not": "a message"})) is None
    assert reader.drops.counts["undecodable body"] == 1
    assert reader.open(writer.seal(StepFailed("attn0.g3", "still served"))) is not None


def test_secret_comes_from_one_line_of_stdin(tmp_path):
    secret = new_secret()
    path = tmp_path / "stdin"
    path.write_text(secret.hex() + "\n")
    with path.open() as f:
        assert read_secret(f) == secret
    path.write_text("")
    with path.open() as f, pytest.raises(ValueError, match="no control-frame secret"):
        read_secret(f)


def _report(num_deltas: int, num_finished: int, num_spans: int, text: str = "") -> StepReport:
    deltas = [TokenDelta(f"r{i}", 0, i, None, None) for i in range(num_deltas)]
    finished = [RequestOutput(f"f{i}", None, [1], [CompletionOutput(0, text, [i], "length")],
                              True) for i in range(num_finished)]
    spans = [Span("x", "attn", i, i + 1, {}) for i in range(num_spans)]
    return StepReport("attn0.g0", deltas, finished, EngineStats(num_running=7), spans)


def test_a_large_report_is_split_in_order_and_a_lone_huge_output_ends_with_an_error():
    secret = new_secret()
    limit = 4096
    writer = FrameWriter(secret, 0, 0, limit)
    reader = FrameReader(secret, FrontInput, 0, "front", from_front=False)
    report = _report(300, 40, 100)
    frames = writer.seal_all(report)
    assert len(frames) > 1 and all(len(f) <= limit for f in frames)
    parts = [reader.open(f) for f in frames]
    assert [d for p in parts for d in p.deltas] == report.deltas
    assert [o for p in parts for o in p.finished] == report.finished
    assert [s for p in parts for s in p.spans] == report.spans
    # Every delta comes before every finished output, and each part has the stats.
    kinds = [k for p in parts for k in ["d"] * len(p.deltas) + ["f"] * len(p.finished)]
    assert kinds == sorted(kinds)
    assert all(p.stats == report.stats for p in parts)
    beat = Heartbeat("ffn0.g0", report.spans, 1.0, 5, "busy")
    beats = [reader.open(f) for f in writer.seal_all(beat)]
    assert [s for b in beats for s in b.spans] == beat.spans and beats[0].progress == 5
    assert split_message(Heartbeat("ffn0.g0")) is None
    # Any two elements go to different parts, so splitting always ends.
    for deltas, finished, spans in [(1, 0, 1), (0, 1, 1), (1, 1, 0), (0, 0, 2)]:
        first, second = split_message(_report(deltas, finished, spans))
        sizes = [len(p.deltas) + len(p.finished) + len(p.spans) for p in (first, second)]
        assert sizes == [1, 1], (deltas, finished, spans)
    assert split_message(_report(0, 1, 0)) is None

    # One output larger than any frame: that request ends with an error; the rest go as they are.
    huge = _report(0, 1, 0, text="x" * limit)
    with pytest.raises(FrameTooLarge):
        writer.seal_all(huge)
    sent: list[bytes] = []

    class _Sock:
        def send(self, frame: bytes, flags: int = 0) -> None:
            sent.append(frame)

    mixed = msgspec.structs.replace(huge, finished=[*_report(0, 2, 0).finished, *huge.finished])
    send_report(SealedPush(_Sock(), writer), mixed)  # type: ignore[arg-type]
    finished = [o for f in sent for o in reader.open(f).finished]
    assert [o.outputs[0].finish_reason for o in finished] == ["length", "length", "error"]
    assert "output too large" in (finished[-1].outputs[0].error or "")
