"""``tessera serve``: its arguments, and the one-line errors of a failed start.

Only argparse is imported at module level, so other subcommands do not pay for FastAPI.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from tessera.engine_args import add_engine_args


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("model", help="Hugging Face model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--served-model-name", default=None, help="model id (default: the directory)")
    add_engine_args(p)
    p.add_argument(
        "--max-waiting",
        type=int,
        default=1024,
        help="sequences that may wait beyond --max-num-seqs; more get 503 with Retry-After",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests may run after SIGINT/SIGTERM before being aborted",
    )
    p.add_argument("--log-level", default="warning", help="uvicorn log level")


def run_serve(args: argparse.Namespace) -> int:
    """Run the server until a signal; errors a user can cause end in one line, exit code 2."""
    from tessera.serve.engine_client import EngineStartupError
    from tessera.serve.runner import serve

    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    try:
        return asyncio.run(serve(args))
    except (ValueError, OSError, EngineStartupError) as e:
        print(f"tessera: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
