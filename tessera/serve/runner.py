"""Running the server: bind, start the engine core, serve, drain on a signal, stop the core.

Start-up order makes every failure cheap and clean: bind the port (in use: one line, exit 2),
start the engine core (bad model: one line, exit 2, the core reaped), then serve. SIGINT and
SIGTERM stop accepting, give in-flight requests ``--shutdown-timeout`` seconds, abort the rest
with a proper final chunk, stop the core and exit 0. A core that fails later is replaced by
the engine client; with ``--exit-on-engine-failure`` (or when restarts keep failing) the server
stops and exits 1 instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Generator
from pathlib import Path

import uvicorn

from tessera.cli_options import options_from_args
from tessera.engine.detokenizer import load_tokenizer
from tessera.engine_args import engine_config_from_args
from tessera.serve.api_key import resolve_api_key
from tessera.serve.api_server import build_app
from tessera.serve.config import ServeConfig
from tessera.serve.engine_client import EngineClient, Finished
from tessera.serve.metrics import ServerMetrics
from tessera.serve.state import ServerState


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
    state.shutting_down = True
    grace_s = 0.0 if forced else state.config.shutdown_grace_s

    async def drain() -> None:
        waited_s = 0.0
        while state.client.num_in_flight and waited_s < grace_s:
            await asyncio.sleep(0.05)
            waited_s += 0.05
        state.client.fail_all(Finished("abort"))

    asyncio.get_running_loop().create_task(drain())


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def serve(args: argparse.Namespace) -> int:
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{args.model!r} is not a model directory (no config.json)")
    engine_config = engine_config_from_args(args)
    # Without a chosen name the model is served under its directory's name (the path is the
    # operator's business) and still answers to the path as given.
    config = options_from_args(
        ServeConfig, args,
        served_model_name=args.served_model_name or model_dir.resolve().name,
        model_aliases=() if args.served_model_name else (args.model,),
        api_key=resolve_api_key(args),
        max_num_seqs=engine_config.scheduler.max_num_seqs,
    )
    sock = _bind(config.host, config.port)
    client = EngineClient(
        engine_config,
        stall_timeout_s=config.engine_stall_timeout_s,
        exit_on_failure=config.exit_on_engine_failure,
    )
    try:
        # The core loads the model while this process loads the tokenizer.
        starting = asyncio.create_task(client.start())
        try:
            tokenizer = await asyncio.to_thread(load_tokenizer, str(model_dir))
        except BaseException:
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
            raise
        ready = await starting
        metrics = ServerMetrics(config.served_model_name)
        client.on_stats = metrics.update_engine
        state = ServerState(
            config, client, tokenizer, metrics, ready.max_model_len, ready.vocab_size
        )
        uv_config = uvicorn.Config(
            build_app(state),
            log_level=args.log_level,
            lifespan="off",
            timeout_graceful_shutdown=int(config.shutdown_grace_s) + 10,
            # Beyond this many open connections and tasks uvicorn answers 503 at once, so a
            # flood of idle connections cannot exhaust the process's file descriptors.
            limit_concurrency=2 * config.max_seqs_in_flight + 64,
        )
        server = _Server(uv_config, state)
        client.on_fatal = lambda _: server.exit_with(1)
        print(
            f"tessera: serving {config.served_model_name!r} on "
            f"http://{config.host}:{config.port}",
            file=sys.stderr,
            flush=True,
        )
        await server.serve(sockets=[sock])
    finally:
        await client.shutdown()
        sock.close()
    return server.exit_code
