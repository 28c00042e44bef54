"""Running the server: bind, start the engine cores, serve, drain on a signal, stop the cores.

Start-up order makes every failure cheap and clean: bind the port (in use: one line, exit 2),
start each model's engine core (a model that cannot load: one line naming it, exit 2, every
core started so far reaped), then serve. SIGINT and SIGTERM stop accepting, give in-flight
requests ``--shutdown-timeout`` seconds, abort the rest with a proper final chunk, stop the
cores and exit 0. A core that fails later is replaced by its engine client; with
``--exit-on-engine-failure`` (or when restarts keep failing) the server stops and exits 1
instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Generator

import uvicorn

from tessera.cli_options import options_from_args
from tessera.engine.detokenizer import load_tokenizer
from tessera.serve.api_key import resolve_api_key
from tessera.serve.api_server import build_app
from tessera.serve.config import ServeConfig, ServedModel
from tessera.serve.engine_client import EngineClient, EngineStartupError, Finished
from tessera.serve.listen import listen_tcp
from tessera.serve.metrics import ServerMetrics
from tessera.serve.served_models import served_models_from_args
from tessera.serve.state import ModelState, ServerState

logger = logging.getLogger("tessera.serve")


class _Server(uvicorn.Server):
    """uvicorn, but a signal starts our drain and the process exits 0 afterwards."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.loop: asyncio.AbstractEventLoop | None = None
        self.exit_code = 0

    def exit_with(self, code: int) -> None:
        """Stop serving (in-flight requests were already ended) and exit with ``code``."""
        self.exit_code = code
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn re-raises the signal after a graceful exit; we exit 0 instead.
        self.loop = asyncio.get_running_loop()
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: object) -> None:
        forced = self.should_exit
        self.should_exit = True
        if self.loop is not None:
            self.loop.call_soon_threadsafe(_begin_drain, self.state, forced)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _begin_drain(state: ServerState, forced: bool) -> None:
    state.begin_shutdown()
    grace_s = 0.0 if forced else state.config.shutdown_grace_s

    async def drain() -> None:
        waited_s = 0.0
        while state.num_in_flight and waited_s < grace_s:
            await asyncio.sleep(0.05)
            waited_s += 0.05
        for model in state.models:
            model.client.fail_all(Finished("abort"))

    asyncio.get_running_loop().create_task(drain())


async def _start_model(
    model: ServedModel, config: ServeConfig, client: EngineClient, metrics: ServerMetrics
) -> ModelState:
    """Start ``model``'s engine core, loading its tokenizer meanwhile; a failure is one
    EngineStartupError naming the model (the caller stops the client)."""
    try:
        starting = asyncio.create_task(client.start())
        try:
            tokenizer = await asyncio.to_thread(load_tokenizer, model.engine.model)
        except BaseException:
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
            raise
        ready = await starting
    except (EngineStartupError, ValueError, OSError) as e:
        raise EngineStartupError(f"model {model.name!r}: {e}") from None
    model_metrics = metrics.for_model(model.name)
    client.on_stats = model_metrics.update_engine
    return ModelState(
        config, model, client, tokenizer, model_metrics, ready.max_model_len, ready.vocab_size
    )


async def _shutdown(clients: list[EngineClient]) -> None:
    """Stop every core at once (each may wait for its engine to finish a step)."""
    results = await asyncio.gather(*(c.shutdown() for c in clients), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            logger.error("stopping an engine core failed", exc_info=result)


async def serve(args: argparse.Namespace) -> int:
    """Serve the models ``args`` name until a signal (or a fatal core failure); the exit code."""
    models = served_models_from_args(args)
    config = options_from_args(
        ServeConfig, args, models=models, api_key=resolve_api_key(args)
    )
    sock = listen_tcp(config.host, config.port)
    metrics = ServerMetrics()
    clients: list[EngineClient] = []
    try:
        started = []
        # One core after another: each sizes its KV cache from the memory the ones before it
        # left, where cores started together would each count the same free memory.
        for model in models:
            client = EngineClient(
                model.engine,
                stall_timeout_s=config.engine_stall_timeout_s,
                exit_on_failure=config.exit_on_engine_failure,
            )
            clients.append(client)
            started.append(await _start_model(model, config, client, metrics))
        state = ServerState(config, started, metrics)
        uv_config = uvicorn.Config(
            build_app(state),
            log_level=args.log_level,
            lifespan="off",
            timeout_graceful_shutdown=int(config.shutdown_grace_s) + 10,
            # Beyond this many open connections and tasks uvicorn answers 503 at once, so a
            # flood of idle connections cannot exhaust the process's file descriptors.
            limit_concurrency=2 * sum(config.max_seqs_in_flight(m) for m in models) + 64,
        )
        server = _Server(uv_config, state)
        for client in clients:
            client.on_fatal = lambda _: server.exit_with(1)
        names = ", ".join(repr(m.name) for m in models)
        print(
            f"tessera: serving {names} on http://{config.host}:{config.port}",
            file=sys.stderr,
            flush=True,
        )
        await server.serve(sockets=[sock])
    finally:
        await _shutdown(clients)
        sock.close()
    return server.exit_code
