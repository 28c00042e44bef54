"""Where the server's API key comes from: a flag, a file, or the environment."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

API_KEY_ENV = "TESSERA_API_KEY"


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
