"""``tessera serve``: its arguments, and the one-line errors of a failed start.

Only argparse is imported at module level, so other subcommands do not pay for FastAPI.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from tessera.cli_options import add_options
from tessera.engine_args import add_engine_args

API_KEY_ENV = "TESSERA_API_KEY"


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


def resolve_api_key(args: argparse.Namespace) -> str | None:
    """The API key from ``--api-key``, ``--api-key-file`` or ``TESSERA_API_KEY`` (at most one
    of the flags; the environment is the fallback). ValueError for an unreadable or empty file."""
    if args.api_key is not None and args.api_key_file is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    if args.api_key_file is not None:
        path = Path(args.api_key_file)
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read --api-key-file {args.api_key_file!r}: {e}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file!r} holds no key")
        return key
    if args.api_key is not None:
        return str(args.api_key)
    return os.environ.get(API_KEY_ENV) or None


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
