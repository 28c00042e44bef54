"""Starts one generation of the worker pool, and makes sure it ends.

This is the one place that chooses where workers run: local processes (here) by default, Ray
actors across hosts (``ray_launcher.py``) when ``AFDConfig.ray_address`` is set. Either way a
pool is started from the same ``WorkerConfig`` per worker, running the same worker main.

Each worker is ``python -m tessera.afd.{attention,ffn}_worker CONFIG_JSON`` in its own session
(so a terminal's Ctrl-C reaches only the front, which then stops them in order), with the
pool's control-frame secret written to its stdin (a command line is visible to every user).
Workers are killed on every exit path: ``kill()``, an ``atexit`` hook for pools still alive,
and each worker's own parent-death check (see ``heartbeat.py``), which covers a front killed
by SIGKILL. ``kill()`` also removes the generation's files (the shared-memory plane, the
workers' ipc sockets), which a killed worker cannot. A pool is never repaired in place: after
a failure the front kills it and starts a new generation on a fresh rendezvous port.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import weakref
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from tessera.afd.shm_plane import SHM_DIR, shm_supported
from tessera.config import AFDConfig, EngineConfig
from tessera.messages.workers import WorkerConfig
from tessera.platform import get_platform

_live_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


class WorkerStartupError(ValueError):
    """The worker pool could not start; the message names the worker and the problem."""


class Pool(Protocol):
    """One generation of workers, wherever they run."""

    configs: list[WorkerConfig]

    @property
    def attention(self) -> list[WorkerConfig]: ...

    def exited(self) -> str | None:
        """A line naming a worker that has exited, if any."""

    def kill(self) -> None:
        """End every worker of the pool; safe to call twice."""


@dataclass(frozen=True)
class PoolLink:
    """How a pool's workers reach their front: the same for every generation."""

    front_address: str
    ipc_dir: str
    """The front's directory of ipc sockets (local workers' inputs live there too)."""
    secret: bytes = field(repr=False)
    """Seals every control frame (``frames.py``); never on a command line."""
    frame_limit_bytes: int


def use_shm_plane(engine: EngineConfig, afd: AFDConfig) -> bool:
    """Whether local workers exchange hidden states through shared memory (``data_plane``)."""
    if afd.data_plane == "torch":
        return False
    if afd.data_plane == "shm":
        if not shm_supported(SHM_DIR):
            raise ValueError(f"data_plane 'shm' is not supported on this host (needs {SHM_DIR} "
                             "and an x86-64 CPU)")
        return True
    return get_platform(engine.device).name == "cpu" and shm_supported(SHM_DIR)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WorkerPool:
    """The local processes of one pool generation: attention ranks first, then FFN ranks."""

    def __init__(self, engine: EngineConfig, afd: AFDConfig, generation: int,
                 link: PoolLink) -> None:
        port = afd.master_port if afd.master_port is not None and generation == 0 else free_port()
        # A fresh directory per generation for the shared-memory plane, removed with the pool.
        self.plane_dir = (
            tempfile.mkdtemp(prefix=f"tessera-plane-g{generation}-", dir=SHM_DIR)
            if use_shm_plane(engine, afd) else None
        )
        self.configs: list[WorkerConfig] = []
        for rank in range(afd.world_size):
            attention = rank < afd.attention_workers
            index = rank if attention else rank - afd.attention_workers
            self.configs.append(WorkerConfig(
                role="attention" if attention else "ffn",
                index=index,
                rank=rank,
                generation=generation,
                engine=engine,
                afd=afd,
                master_port=port,
                front_address=link.front_address,
                input_address=(f"ipc://{link.ipc_dir}/attn{index}.g{generation}" if attention
                               else None),
                parent_pid=os.getpid(),
                plane_dir=self.plane_dir,
                ipc_dir=link.ipc_dir,
                frame_limit_bytes=link.frame_limit_bytes,
            ))
        self.procs: dict[str, subprocess.Popen] = {}
        _live_pools.add(self)
        try:
            for cfg in self.configs:
                module = f"tessera.afd.{cfg.role}_worker"
                proc = subprocess.Popen(
                    [sys.executable, "-m", module, msgspec.json.encode(cfg).decode()],
                    start_new_session=True, stdin=subprocess.PIPE,
                )
                self.procs[cfg.name] = proc
                assert proc.stdin is not None
                with contextlib.suppress(BrokenPipeError), proc.stdin:
                    proc.stdin.write(link.secret.hex().encode() + b"\n")
        except BaseException:
            self.kill()  # none of a half-started pool may outlive this
            raise

    @property
    def attention(self) -> list[WorkerConfig]:
        return [c for c in self.configs if c.role == "attention"]

    def exited(self) -> str | None:
        """A line naming a worker that has exited, if any. One killed by a signal comes first:
        its peers exit on their own (code 1) once they see it gone, as a consequence."""
        codes = {name: code for name, proc in self.procs.items()
                 if (code := proc.poll()) is not None}
        if not codes:
            return None
        name = min(codes, key=lambda n: codes[n] >= 0)
        return f"worker {name.split('.')[0]} exited (code {codes[name]})"

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait()
        # What the workers leave behind when killed: the plane's files, their ipc sockets.
        if self.plane_dir is not None:
            shutil.rmtree(self.plane_dir, ignore_errors=True)
        for cfg in self.attention:
            assert cfg.input_address is not None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cfg.input_address.removeprefix("ipc://"))
        _live_pools.discard(self)


def track(pool: Pool) -> None:
    """Kill ``pool`` at interpreter exit if it is still alive then."""
    _live_pools.add(pool)


def untrack(pool: Pool) -> None:
    _live_pools.discard(pool)


@atexit.register
def _kill_live_pools() -> None:
    for pool in list(_live_pools):
        pool.kill()
