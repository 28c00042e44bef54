"""Where a pool's workers run: local processes (``launcher``) or Ray actors (``ray_launcher``,
imported only when asked for: Ray is an optional dependency)."""

from __future__ import annotations

from dataclasses import replace

import zmq

from tessera.afd.launcher import Pool, PoolLink, WorkerPool
from tessera.config import AFDConfig, EngineConfig
from tessera.kv.store_process import StoreProcess


def bind_front(sock: zmq.Socket, afd: AFDConfig, ipc_dir: str) -> str:
    """Bind the front's PULL socket where every worker can reach it; returns its address.
    Local workers use an ipc socket; Ray workers, on any node, a TCP port on this node's IP
    (this connects to the Ray cluster first: WorkerStartupError if that fails). Only that
    interface: never all of them."""
    if afd.ray_address is None:
        address = f"ipc://{ipc_dir}/front"
        sock.bind(address)
        return address
    from tessera.afd.ray_launcher import node_ip  # ray is an optional dependency

    ip = node_ip(afd.ray_address)
    port = sock.bind_to_random_port(f"tcp://{ip}")
    return f"tcp://{ip}:{port}"


def start_pool(engine: EngineConfig, afd: AFDConfig, generation: int, link: PoolLink) -> Pool:
    """Start generation ``generation`` of the pool: Ray actors if ``afd.ray_address`` is set,
    else local processes. Returns once every worker is started (not yet ready)."""
    if afd.ray_address is None:
        return WorkerPool(engine, afd, generation, link)
    from tessera.afd.ray_launcher import RayWorkerPool

    return RayWorkerPool(engine, afd, generation, link)


def share_host_tier(engine: EngineConfig, afd: AFDConfig,
                    ipc_dir: str) -> tuple[EngineConfig, StoreProcess | None]:
    """The engine config the workers get, and the host KV store started for them, if any.

    Local attention workers share one host tier of ``kv_offload_memory`` bytes through a
    store the front owns (it outlives pool generations, so a restarted pool finds it warm).
    Ray workers keep a host tier each: their hosts are not this one."""
    if engine.cache.kv_offload_memory is None or afd.ray_address is not None:
        return engine, None
    store = StoreProcess.in_dir(ipc_dir, engine.cache.kv_offload_memory)
    return replace(engine, cache=engine.cache.on_host_store(store.address)), store
