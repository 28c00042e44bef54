"""The API process's engine client: its background tasks fail loudly, never silently.

A reader task that dies would leave every request waiting forever; instead the requests in
flight end with an error, the client reports itself not alive (``/health`` 503) and replaces
the core. Garbage on the core's socket is dropped. The streaming path's work per token does not
grow with the sequence's length.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq

from tessera.config import CacheConfig, EngineConfig
from tessera.sampling_params import SamplingParams
from tessera.serve.engine_client import EngineClient, Finished
from tessera.serve.generation import ChoiceState
from tests.test_serve_util import build_server_model

OPTIONS = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)


async def _next_event(queue: asyncio.Queue, timeout_s: float = 60.0):
    return await asyncio.wait_for(queue.get(), timeout_s)


async def _until(cond, timeout_s: float) -> None:
    deadline_s = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline_s
        await asyncio.sleep(0.05)


@pytest.mark.processes
@pytest.mark.slow
def test_a_failed_reader_fails_requests_and_the_core_is_replaced(tmp_path):
    model = build_server_model(tmp_path / "m", chat_template=False)
    config = EngineConfig(str(model), dtype="float32", device="cpu", num_threads=1,
                          cache=CacheConfig(kv_cache_memory=8 << 20))  # fmt: skip

    async def scenario() -> None:
        client = EngineClient(config)
        await client.start()
        try:
            first_pid = client.process.pid  # type: ignore[union-attr]
            # Garbage on the core's socket is dropped, not fatal.
            ctx = zmq.Context()
            rogue = ctx.socket(zmq.PUSH)
            rogue.connect(client._output_address)
            rogue.send(b"\xc1 not msgpack")
            queue = client.add_request("a", [5, 6, 7], OPTIONS)
            assert isinstance(await _next_event(queue), list)
            rogue.close(linger=1000)
            ctx.term()
            assert client.alive
            # A callback that raises kills the reader task: the failure must not be silent.
            def broken(_stats):
                raise RuntimeError("injected")

            client.on_stats = broken
            event = None
            while not isinstance(event, Finished):
                event = await _next_event(queue)
            assert event.reason == "error" and "internal task" in (event.error or "")
            assert not client.alive
            client.on_stats = None
            await _until(lambda: client.alive, 180)
            assert client.process.pid != first_pid  # type: ignore[union-attr]
            # A new reader serves the new core.
            queue = client.add_request("b", [5, 6, 7], OPTIONS)
            assert isinstance(await _next_event(queue), list)
            client.release("b", abort=True)
        finally:
            await client.shutdown()

    asyncio.run(scenario())


class _CountingTokenizer:
    """Decodes ids as letters, counting the ids it is given (the detokenizer's whole work)."""

    def __init__(self) -> None:
        self.num_ids_decoded = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.num_ids_decoded += len(ids)
        return "".join(chr(97 + i % 26) for i in ids)


def _feed_cost_s(num_tokens: int) -> tuple[float, int]:
    tok = _CountingTokenizer()
    choice = ChoiceState(0, tok, [1, 2, 3, 4, 5, 6], stop=["zzzz"])
    start_s = time.perf_counter()
    for i in range(num_tokens):
        choice.feed(i % 25, None, None)
    return time.perf_counter() - start_s, tok.num_ids_decoded


def test_streaming_work_per_token_does_not_grow_with_length():
    # Decoding reads a window of a few tokens, whatever the length.
    _, small_ids = _feed_cost_s(2_000)
    _, large_ids = _feed_cost_s(16_000)
    assert large_ids <= 8 * small_ids * 1.05
    # And nothing else grows: 8x the tokens may cost 8x the time, never the 64x of a copy per
    # token (best of three, so a busy machine does not decide).
    small_s = min(_feed_cost_s(2_000)[0] for _ in range(3))
    large_s = min(_feed_cost_s(16_000)[0] for _ in range(3))
    assert large_s < 20 * small_s, (small_s, large_s)
