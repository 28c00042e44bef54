"""``tessera router``: its arguments, and the one-line errors of a failed start."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tessera.cli_options import add_options, options_from_args
from tessera.config import ClusterConfig
from tessera.router.config import ROUTER_FIELDS, RouterConfig


def add_router_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "router", help="one OpenAI-compatible endpoint in front of running Tessera servers, "
        "placing each request by the prefix blocks each holds and its load")
    p.add_argument("--instance", dest="instances", action="append", default=[],
                   metavar="URL", help="base URL of a running 'tessera serve' (repeat for each)")
    p.add_argument("--prefill-instance", dest="prefill_urls", action="append",
                   default=[], metavar="URL",
                   help="a server that computes prompts (with --decode-instance; the servers "
                   "share a KV tier, such as --kv-store redis://HOST)")
    p.add_argument("--decode-instance", dest="decode_urls", action="append", default=[],
                   metavar="URL", help="a server that generates from the prompts' blocks the "
                   "prefill servers left in the shared KV tier")
    p.add_argument("--upstream-api-key-file", default=None, metavar="FILE",
                   help="the instances' API key (first line of FILE), for the router's own "
                   "calls to them; clients' requests carry their own")
    add_options(p, RouterConfig)
    add_options(p, ClusterConfig, names=ROUTER_FIELDS)
    p.add_argument("--log-level", default="warning", help="uvicorn log level")


def router_config(args: argparse.Namespace) -> RouterConfig:
    """The config of parsed flags; ValueError naming what is wrong."""
    key = None
    if args.upstream_api_key_file is not None:
        try:
            lines = Path(args.upstream_api_key_file).read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read --upstream-api-key-file: {exc.strerror or exc}") from exc
        key = lines[0].strip() if lines else ""
        if not key:
            raise ValueError("--upstream-api-key-file is empty")
    cluster = options_from_args(ClusterConfig, args)
    return options_from_args(RouterConfig, args, instances=tuple(args.instances),
                             prefill_instances=tuple(args.prefill_urls),
                             decode_instances=tuple(args.decode_urls),
                             upstream_api_key=key, cluster=cluster)


def run_router(args: argparse.Namespace) -> int:
    """Serve until a signal; a bad flag ends in one line and exit code 2."""
    import uvicorn

    from tessera.router.app import build_app
    from tessera.serve.listen import listen_tcp

    logging.basicConfig(format="tessera router: %(levelname)s: %(message)s",
                        level=logging.WARNING)
    try:
        config = router_config(args)
    except ValueError as exc:
        print(f"tessera router: error: {exc}", file=sys.stderr)
        return 2
    try:
        sock = listen_tcp(config.host, config.port)
    except OSError as exc:
        print(f"tessera router: error: {exc}", file=sys.stderr)
        return 2
    try:
        server = uvicorn.Server(uvicorn.Config(
            build_app(config), log_level=args.log_level,
            limit_concurrency=config.max_connections))
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
