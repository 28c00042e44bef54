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

    p = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API")
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face model directory (more models: --model, --config)")
    p.add_argument("--served-model-name", default=None,
                   help="model id of the directory given as the first argument (default: the "
                   "directory's name; requests may also name the path given)")
    p.add_argument("--model", dest="models", action="append", default=None,
                   metavar="NAME=PATH",
                   help="also serve the model directory PATH as NAME, with an engine core of "
                   "its own (repeat for more models)")
    p.add_argument("--config", dest="config_file", default=None, metavar="FILE",
                   help="TOML file with a [models.NAME] table per model: path (the model "
                   "directory, relative to FILE) and engine options by their config field "
                   "names (max_num_seqs = 64), over the command line's")
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
