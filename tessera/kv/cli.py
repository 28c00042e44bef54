"""``tessera kv ls|stats|clear DIR``: look into and empty an SSD KV tier.

A tier directory holds one subdirectory per cache layout (model, KV dtype, block shape),
named by its fingerprint, each holding block files. Nothing here loads a model or torch.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from tessera.kv import block_file
from tessera.kv.disk_tier import SUFFIX, _key_of

_HEAD_BYTES = 64 << 10  # enough for any header a healthy block file has


def add_kv_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("kv", help="inspect or empty an SSD KV tier directory "
                                  "('tessera kv ls|stats|clear DIR')")
    kv = p.add_subparsers(dest="kv_command", required=True)
    ls = kv.add_parser("ls", help="one line per cache layout: blocks, bytes, last write")
    ls.add_argument("dir", help="the --kv-offload-dir of a server")
    st = kv.add_parser("stats", help="check every block file's header and count bad ones")
    st.add_argument("dir")
    store = kv.add_parser("store", help="run a host KV store: shared memory that the engines "
                                        "given --kv-host-store use as their host tier")
    store.add_argument("--address", required=True, help="ipc://PATH to listen on")
    store.add_argument("--memory", type=int, required=True, help="bytes of shared memory")
    cl = kv.add_parser("clear", help="delete every block file (all layouts, or one)")
    cl.add_argument("dir")
    cl.add_argument("--layout", help="only this layout (a fingerprint 'ls' printed)")


def _layouts(root: Path) -> list[Path]:
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    return sorted(p for p in root.iterdir() if p.is_dir() and len(p.name) == 32
                  and all(c in "0123456789abcdef" for c in p.name))


def _block_files(layout: Path) -> list[Path]:
    return [p for p in layout.glob(f"??/*{SUFFIX}") if _key_of(p) is not None]


def run_kv(args: argparse.Namespace) -> int:
    if args.kv_command == "store":
        from tessera.kv.store import main as store_main

        return store_main(["--address", args.address, "--memory", str(args.memory)])
    root = Path(args.dir)
    layouts = _layouts(root)
    if args.kv_command == "clear":
        chosen = [p for p in layouts if args.layout in (None, p.name)]
        if args.layout is not None and not chosen:
            raise ValueError(f"no layout {args.layout} under {root}")
        num_files = sum(len(_block_files(p)) for p in chosen)
        for p in chosen:
            shutil.rmtree(p)
        print(f"removed {num_files} block files in {len(chosen)} layout(s) from {root}")
        return 0
    print(f"{'layout':32}  {'blocks':>8}  {'MiB':>10}" + (
        f"  {'bad':>5}  {'tokens':>9}" if args.kv_command == "stats" else ""))
    for layout in layouts:
        files = _block_files(layout)
        num_bytes = sum(f.stat().st_size for f in files)
        line = f"{layout.name:32}  {len(files):>8}  {num_bytes / 2**20:>10.1f}"
        if args.kv_command == "stats":
            num_bad = num_tokens = 0
            for f in files:
                try:
                    with f.open("rb") as fh:
                        header = block_file.read_header(fh.read(_HEAD_BYTES))
                    if header.fingerprint != layout.name or f.stat().st_size < (
                            header.num_payload_bytes):
                        raise block_file.BlockFileError("foreign or truncated")
                    num_tokens += len(header.token_ids)
                except (OSError, block_file.BlockFileError):
                    num_bad += 1
            line += f"  {num_bad:>5}  {num_tokens:>9}"
        print(line)
    if not layouts:
        print(f"(no KV blocks under {root})")
    return 0
