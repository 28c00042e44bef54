"""``tessera serve``: its arguments, and the one-line errors of a failed start.

Only argparse is imported at module level, so other subcommands do not pay for FastAPI.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from tessera.cli_options import add_options
from tessera.engine_args import add_engine_args


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    from tessera.serve.config import ServeConfig

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("model", help="Hugging Face model directory")
    p.add_argument("--served-model-name", default=None,
                   help="model id (default: the directory's name; requests may also name the "
                   "path given)")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="read the API key from FILE (its first line)")
    add_options(p, ServeConfig)
    add_engine_args(p)
    p.add_argument("--log-level", default="warning", help="uvicorn log level")


def run_serve(args: argparse.Namespace) -> int:
    """Run the server until a signal; errors a user can cause end in one line, exit code 2."""
    from tessera.serve.engine_client import EngineStartupError
    from tessera.serve.runner import serve

    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    logging.basicConfig(format="tessera: %(levelname)s: %(message)s", level=logging.WARNING)
    try:
        return asyncio.run(serve(args))
    except (ValueError, OSError, EngineStartupError) as e:
        print(f"tessera: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
