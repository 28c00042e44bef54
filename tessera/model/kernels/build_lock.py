"""A cross-process lock around one kernel build directory that cannot go stale.

``torch.utils.cpp_extension.load`` serialises builders with a baton: it creates ``lock`` in the
build directory with ``O_EXCL``, builds, and deletes it; every other process polls until the file
is gone. A builder killed in between (``kill -9``, OOM killer, a closed terminal) leaves the
file behind, and every later process waits on it forever.

Tessera therefore takes its own lock first: ``flock`` on ``tessera.lock`` in the same
directory. The kernel drops an ``flock`` when its holder dies, so holding it proves no live
Tessera process is building there, and a baton found then was left by a dead one: it is
removed before torch looks at it. One exception is checked where Linux shows it: a process
that does not take Tessera's lock (an older Tessera sharing the extensions cache, another
tool) may be building right now, and it keeps the baton open; a baton some process has open
is left to torch. The holder's pid is written into the lock file so the message can say whose
build was interrupted. Waiting for a live builder is bounded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

TORCH_BATON_NAME = "lock"
"""The file torch's ``FileBaton`` creates in the build directory (``cpp_extension._jit_compile``)."""

LOCK_NAME = "tessera.lock"

_POLL_S = 0.05  # between attempts at a lock another live process holds


class BuildLockTimeout(TimeoutError):
    """Another live process held the build lock for longer than the caller would wait."""


def _read_owner(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _write_owner(fd: int) -> None:
    data = f"{os.getpid()}\n".encode("ascii")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _flock(fd: int, path: Path, timeout_s: float) -> bool:
    """Take ``flock`` on ``fd`` within ``timeout_s``; False where the file system lacks it."""
    import fcntl

    deadline_s = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline_s:
                owner = _read_owner(fd)
                raise BuildLockTimeout(
                    f"{path} is still held by pid {owner if owner is not None else '?'} after"
                    f" {timeout_s:.0f} s (a kernel build in another process)"
                ) from None
            time.sleep(_POLL_S)
        except OSError as exc:  # e.g. ENOLCK on some network file systems
            logger.warning("cannot lock %s (%s); a stale torch build lock there is not "
                           "cleared", path, exc)
            return False


def baton_in_use(baton: Path) -> bool | None:
    """Whether a live process has ``baton`` open (torch keeps it open while it builds);
    None where that cannot be seen (no ``/proc``: not Linux)."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target = os.path.realpath(baton)
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:  # processes come and go, and other users' are not ours to read
            fds = os.listdir(entry / "fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(entry / "fd" / fd) == target:
                    return True
            except OSError:
                continue
    return False


def _clear_stale_baton(build_dir: Path, previous_owner: int | None) -> None:
    baton = build_dir / TORCH_BATON_NAME
    if not baton.exists():
        return
    if baton_in_use(baton):
        logger.info("%s is held by a live build outside Tessera's lock; torch waits for it",
                    baton)
        return
    who = f"pid {previous_owner}" if previous_owner is not None else "a process"
    logger.warning("removing %s: a kernel build by %s was interrupted and left it behind",
                   baton, who)
    with contextlib.suppress(FileNotFoundError):
        baton.unlink()


@contextlib.contextmanager
def build_lock(build_dir: Path, timeout_s: float) -> Iterator[None]:
    """Hold Tessera's build lock on ``build_dir`` for the body; clear a dead builder's baton.

    Waits at most ``timeout_s`` for a live holder and then raises :class:`BuildLockTimeout`.
    Without ``fcntl`` (Windows) or ``flock`` support, the body runs unlocked and any baton is
    left alone (whether its owner lives cannot be told)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    path = build_dir / LOCK_NAME
    try:
        import fcntl  # noqa: F401 - POSIX only
    except ImportError:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if _flock(fd, path, timeout_s):
            _clear_stale_baton(build_dir, _read_owner(fd))
            _write_owner(fd)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
