"""Starts one generation of the worker pool as local processes, and makes sure it ends.

Each worker is ``python -m tessera.afd.{attention,ffn}_worker CONFIG_JSON`` in its own session
(so a terminal's Ctrl-C reaches only the front, which then stops them in order). Workers are
killed on every exit path: ``kill()``, an ``atexit`` hook for pools still alive, and each
worker's own parent-death check (see ``heartbeat.py``), which covers a front killed by SIGKILL.
A pool is never repaired in place: after a failure the front kills it and starts a new
generation on a fresh rendezvous port.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import weakref

import msgspec

from tessera.afd.config import AFDConfig
from tessera.afd.messages import WorkerConfig
from tessera.config import EngineConfig

_live_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WorkerPool:
    """The processes of one pool generation: attention ranks first, then FFN ranks."""

    def __init__(self, engine: EngineConfig, afd: AFDConfig, generation: int,
                 front_address: str, ipc_dir: str) -> None:
        port = afd.master_port if afd.master_port is not None and generation == 0 else free_port()
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
                front_address=front_address,
                input_address=f"ipc://{ipc_dir}/attn{index}.g{generation}" if attention else None,
                parent_pid=os.getpid(),
            ))
        self.procs: dict[str, subprocess.Popen] = {}
        _live_pools.add(self)
        try:
            for cfg in self.configs:
                module = f"tessera.afd.{cfg.role}_worker"
                self.procs[cfg.name] = subprocess.Popen(
                    [sys.executable, "-m", module, msgspec.json.encode(cfg).decode()],
                    start_new_session=True,
                )
        except BaseException:
            self.kill()  # none of a half-started pool may outlive this
            raise

    @property
    def attention(self) -> list[WorkerConfig]:
        return [c for c in self.configs if c.role == "attention"]

    def exited(self) -> str | None:
        """A line naming a worker that has exited, if any."""
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                return f"worker {name.split('.')[0]} exited (code {code})"
        return None

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait()
        _live_pools.discard(self)


@atexit.register
def _kill_live_pools() -> None:
    for pool in list(_live_pools):
        pool.kill()
