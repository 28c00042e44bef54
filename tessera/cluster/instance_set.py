"""The instances of one cluster as processes: their configs, starts, health and restarts.

The front (``front.py``) decides what happens to requests; this keeps the processes: it
starts every instance, says which have failed (exited, never ready, or silent with requests
pending), takes a failed one out and starts it again (at once if it had been ready, after a
back-off if it never was), and stops them all. It owns the host KV store the instances share,
if any.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import zmq

from tessera.cluster.instances import InstanceProcess, decode_output
from tessera.cluster.leases import HandoffLeases
from tessera.config import ClusterConfig, EngineConfig
from tessera.kv.store_process import StoreProcess
from tessera.messages.common import Ready, Shutdown, StartupFailed

if TYPE_CHECKING:
    from tessera.cluster.ray_instances import RayFront

RESTART_BACKOFF_S = 30.0
"""Wait before starting again an instance that failed before it was ever ready."""


def instance_configs(config: EngineConfig, cluster: ClusterConfig) -> list[EngineConfig]:
    """Each instance's engine config: a GPU each on an accelerator host (ValueError with
    fewer GPUs than instances), else the host's cores shared out unless threads are given."""
    n = cluster.num_instances
    devices = [config.device] * n
    if cluster.instances_ray_address is not None:
        # Ray places each actor on a node with its CPUs (and GPU) free; it sees one GPU.
        device = "cpu" if config.device == "cpu" else "cuda"
        return [replace(config, cluster=None, num_threads=config.num_threads or 1,
                        device=device, afd=None) for _ in range(n)]
    if config.device != "cpu":
        import torch

        num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if num_gpus:
            if num_gpus < n:
                raise ValueError(f"{n} instances need a GPU each; this host has {num_gpus}")
            devices = [f"cuda:{i}" for i in range(n)]
        elif config.device != "auto":
            raise ValueError(f"device {config.device!r} is not available")
        else:
            devices = ["cpu"] * n
    threads = config.num_threads or max(1, (os.cpu_count() or 1) // n)
    group = cluster.decode_group()
    return [replace(config, cluster=None, num_threads=threads, device=device,
                    afd=group if role == "decode" else None)
            for device, role in zip(devices, cluster.roles, strict=True)]


def host_store_bytes(config: EngineConfig, cluster: ClusterConfig) -> int | None:
    """Bytes of the host KV store the instances share: the host tier asked for, or for
    prefill/decode pools (whose handoff goes through it) room for what the prefill
    instances' caches hold."""
    cache = config.cache
    if cache.kv_offload_memory is None and cluster.prefill_instances:
        return (cache.kv_cache_memory or 1 << 30) * cluster.prefill_instances
    return cache.kv_offload_memory


class InstanceSet:
    """Starts the instances of ``cluster`` (``instances[i]`` is instance i's current start)
    and waits until all are ready; ValueError (and nothing left running) if one fails."""

    def __init__(self, config: EngineConfig, cluster: ClusterConfig) -> None:
        self.cluster = cluster
        self.instances: list[InstanceProcess] = []
        self.num_restarts = [0] * cluster.num_instances
        self._respawn_at: dict[int, float] = {}
        self._dir = tempfile.mkdtemp(prefix="tessera-cluster-")
        self._ctx = zmq.Context()
        self._store: StoreProcess | None = None
        self.leases: HandoffLeases | None = None
        """Pins on handed-over blocks in the shared store (prefill/decode pools only)."""
        self._closed = False
        self._ray: RayFront | None = None
        try:
            self._configs = instance_configs(config, cluster)
            if cluster.instances_ray_address is not None:
                from tessera.cluster.ray_instances import RayFront

                self._ray = RayFront(self._ctx, cluster.instances_ray_address)
            memory = host_store_bytes(config, cluster)
            if memory is not None:
                self._store = StoreProcess.in_dir(self._dir, memory)
                cache = config.cache.on_host_store(self._store.address)
                if cluster.prefill_instances:
                    self.leases = HandoffLeases(self._ctx, self._store.address,
                                                config.cache.block_size)
                self._configs = [replace(c, cache=cache) for c in self._configs]
            for i in range(len(self._configs)):  # one by one: all are stopped on failure
                self.instances.append(self._start(i, 0))
            self._await_ready()
        except BaseException:
            self.close()
            raise

    def _start(self, index: int, generation: int) -> InstanceProcess:
        if self._ray is not None:
            return InstanceProcess.start_on_ray(
                self._ray, self._ctx, self._configs[index], index, generation,
                self.cluster.instance_startup_timeout_s)
        return InstanceProcess.start(self._ctx, self._configs[index], index, generation,
                                     self._dir)

    def _await_ready(self) -> None:
        deadline = time.monotonic() + self.cluster.instance_startup_timeout_s
        while any(inst.ready is None for inst in self.instances):
            for inst in self.instances:
                if inst.ready is not None:
                    continue
                if inst.output.poll(0):
                    msg = decode_output(inst.output.recv())
                    if isinstance(msg, StartupFailed):
                        raise ValueError(f"{inst.name}: {msg.message}")
                    if isinstance(msg, Ready):
                        inst.ready = msg
                elif inst.exited() is not None:
                    raise ValueError(f"{inst.name} exited with code {inst.exited()} while "
                                     "starting")
            if time.monotonic() > deadline:
                raise ValueError("the instances did not start within "
                                 f"{self.cluster.instance_startup_timeout_s:g} s")
            time.sleep(0.02)

    @property
    def live(self) -> list[InstanceProcess]:
        """Instances whose sockets may be read (not taken out)."""
        return [inst for inst in self.instances if not inst.closed]

    def failures(self) -> list[tuple[InstanceProcess, str]]:
        """Instances that have failed, each with a line saying how."""
        if self._store is not None:
            self._store.check()  # instances reattach to a restarted store by themselves
        now = time.monotonic()
        startup_s = self.cluster.instance_startup_timeout_s
        stall_s = self.cluster.instance_stall_timeout_s
        found = []
        for inst in self.live:
            code = inst.exited()
            if code is not None:
                found.append((inst, f"{inst.name} exited with code {code}"))
            elif inst.ready is None and now - inst.started_s > startup_s:
                found.append((inst, f"{inst.name} did not start within {startup_s:g} s"))
            elif inst.request_ids and now - inst.last_seen_s > stall_s:
                found.append((inst, f"{inst.name} made no progress for "
                                    f"{now - inst.last_seen_s:.0f} s with requests pending"))
        return found

    def take_out(self, inst: InstanceProcess) -> bool:
        """Kill a failed instance and schedule its restart; False if it was out already."""
        if inst.closed or self.instances[inst.index] is not inst:
            return False
        inst.kill()
        delay_s = 0.0 if inst.ready is not None else RESTART_BACKOFF_S
        self._respawn_at[inst.index] = time.monotonic() + delay_s
        return True

    def restart_due(self) -> None:
        """Start again the instances taken out whose time has come (not waiting for them)."""
        now = time.monotonic()
        for index, at in list(self._respawn_at.items()):
            if now >= at:
                del self._respawn_at[index]
                self.num_restarts[index] += 1
                old = self.instances[index]
                self.instances[index] = self._start(index, old.generation + 1)

    def close(self) -> None:
        """Stop every instance (each lands its KV tiers' writes first); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for inst in self.instances:  # all stop at once
            if not inst.closed:
                with contextlib.suppress(zmq.ZMQError):
                    inst.send(Shutdown())
        for inst in self.instances:
            inst.kill(graceful_s=10.0)
        if self.leases is not None:
            self.leases.close()
        if self._ray is not None:
            self._ray.close()
        if self._store is not None:
            self._store.close()
        self._ctx.destroy(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)
