"""Starts one generation of the worker pool as Ray actors, possibly on several hosts.

One placement group per generation, one bundle per worker (``{"CPU": threads}``, plus one GPU
on CUDA), packed onto as few nodes as the cluster allows. Each worker is an actor pinned to
its bundle that runs the same worker main as a local process, with the same ``WorkerConfig``;
only the addresses differ: the data-plane rendezvous is a free port on the node of rank 0,
each attention worker's input is a free TCP port on its own node, and the front listens on
its node's IP (see ``pools.bind_front``), so every node reaches every address.

Failures are handled as for local processes: an actor whose ``run`` call has ended (its
process exited or died) is a worker that exited; ``kill`` ends every actor and removes the
placement group, and waits (bounded) until both are gone, so the next generation's group does
not queue behind the resources of the last one. Every wait has a deadline and ends in an
error that says what did not happen. Actors are owned by the front's
process, so Ray ends them if the front dies. Ray is connected to once per process and the
connection is kept (later engines reuse it); a Ray already initialised by the caller is used
as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import socket
import time
from typing import Any

import msgspec

from tessera.afd.launcher import PoolLink, WorkerStartupError, track, untrack
from tessera.config import AFDConfig, EngineConfig
from tessera.messages.workers import WorkerConfig

_HEALTH_CHECK_S = 0.1  # ray.wait per engine step would cost more than a step of a tiny model
_RELEASE_TIMEOUT_S = 30.0
"""Longest ``kill`` waits for the actors to die and the placement group to be removed."""

logger = logging.getLogger(__name__)


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise WorkerStartupError(
            "ray_address needs Ray: pip install 'tessera[ray]'"
        ) from e
    return ray


def connect(address: str) -> Any:
    """The ``ray`` module, connected to ``address`` (once per process)."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    _probe(address)
    try:
        ray.init(address=address, log_to_driver=False,
                 logging_level="ERROR", configure_logging=True)
    except (Exception, SystemExit) as e:  # Ray exits when its retries run out
        with contextlib.suppress(Exception):
            ray.shutdown()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WorkerStartupError(f"cannot connect to the Ray cluster at {address!r}: {first}") \
            from e
    return ray


def _probe(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast on a HOST:PORT nobody listens on (Ray itself retries for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local": Ray finds (or starts) the cluster itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise WorkerStartupError(
            f"cannot connect to the Ray cluster at {address!r}: {e.strerror or e}"
        ) from e


def node_ip(address: str) -> str:
    """This process's IP as the Ray cluster at ``address`` sees it (connecting first)."""
    ray = connect(address)
    return str(ray.util.get_node_ip_address())


class _WorkerActor:
    """A worker's home on its node: says where it is, then runs the worker main."""

    def where(self) -> tuple[str, str, int]:
        """This actor's node IP, node id and process id."""
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        return str(ray.util.get_node_ip_address()), str(node_id), os.getpid()

    def free_ports(self, ip: str, num_ports: int) -> list[int]:
        """Distinct TCP ports free on this node's ``ip`` now (all held until all are picked)."""
        with contextlib.ExitStack() as stack:
            socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                     for _ in range(num_ports)]
            for s in socks:
                s.bind((ip, 0))
            return [int(s.getsockname()[1]) for s in socks]

    def run(self, role: str, config_json: str, secret: bytes) -> int:
        """The worker main, as ``python -m tessera.afd.{role}_worker`` would run it (the
        secret comes as an argument: Ray ships it to this actor, not on a command line)."""
        module = importlib.import_module(f"tessera.afd.{role}_worker")
        return int(module.main([config_json], secret))


def _brief(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


class RayWorkerPool:
    """The actors of one pool generation: attention ranks first, then FFN ranks."""

    def __init__(self, engine: EngineConfig, afd: AFDConfig, generation: int,
                 link: PoolLink) -> None:
        assert afd.ray_address is not None
        ray = connect(afd.ray_address)
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray = ray
        self._remove_placement_group = remove_placement_group
        self.configs: list[WorkerConfig] = []
        self.actors: dict[str, Any] = {}  # by worker name
        self.node_ids: dict[str, str] = {}  # the Ray node each worker runs on
        self.pids: dict[str, int] = {}
        self._runs: dict[Any, str] = {}  # ObjectRef of each worker's run -> its name
        self._pg: Any = None
        self._checked_at = 0.0
        self._exited: str | None = None
        track(self)
        try:
            num_cpus, num_gpus, engine = self._resources(engine)
            bundle = {"CPU": float(num_cpus)} | ({"GPU": float(num_gpus)} if num_gpus else {})
            self._pg = placement_group([bundle] * afd.world_size, strategy="PACK")
            ready, _ = ray.wait([self._pg.ready()], timeout=afd.placement_timeout_s)
            if not ready:
                raise WorkerStartupError(
                    f"the Ray cluster cannot place {afd.world_size} workers of {bundle} within "
                    f"{afd.placement_timeout_s:g} s (free now: {_free(ray)})"
                )
            actor_cls = ray.remote(_WorkerActor)
            names = [_name(rank, afd, generation) for rank in range(afd.world_size)]
            for rank, name in enumerate(names):
                self.actors[name] = actor_cls.options(
                    num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self._pg, placement_group_bundle_index=rank),
                ).remote()
            actors = [self.actors[n] for n in names]
            # Where each actor landed, a rendezvous port on rank 0's node and an input port
            # on each attention worker's node.
            # One deadline for the actors to come up (their processes start on loaded nodes).
            deadline_s = time.monotonic() + afd.startup_timeout_s
            places = self._get([a.where.remote() for a in actors], afd, names, deadline_s)
            # Rank 0 needs two: its input and the rendezvous.
            ports = self._get([a.free_ports.remote(places[rank][0], 2 if rank == 0 else 1)
                               for rank, a in enumerate(actors)], afd, names, deadline_s)
            for name, (_, node_id, pid) in zip(names, places, strict=True):
                self.node_ids[name] = node_id
                self.pids[name] = pid
            master_port = (afd.master_port if afd.master_port is not None and generation == 0
                           else ports[0][1])
            for rank in range(afd.world_size):
                attention = rank < afd.attention_workers
                ip = places[rank][0]
                self.configs.append(WorkerConfig(
                    role="attention" if attention else "ffn",
                    index=rank if attention else rank - afd.attention_workers,
                    rank=rank,
                    generation=generation,
                    engine=engine,
                    afd=afd,
                    master_port=master_port,
                    front_address=link.front_address,
                    input_address=f"tcp://{ip}:{ports[rank][0]}" if attention else None,
                    parent_pid=0,
                    master_addr=places[0][0],
                    host_addr=ip,
                    frame_limit_bytes=link.frame_limit_bytes,
                ))
            for cfg in self.configs:
                ref = self.actors[cfg.name].run.remote(
                    cfg.role, msgspec.json.encode(cfg).decode(), link.secret)
                self._runs[ref] = cfg.name
        except BaseException:
            self.kill()  # no actor or placement group of a half-started pool may remain
            raise

    @staticmethod
    def _resources(engine: EngineConfig) -> tuple[int, int, EngineConfig]:
        """CPUs and GPUs per worker, and the engine config as a worker sees it (Ray shows
        each actor its one GPU as ``cuda:0``)."""
        num_cpus = engine.num_threads or 1
        if engine.device.startswith("cuda"):
            return num_cpus, 1, dataclasses.replace(engine, device="cuda")
        return num_cpus, 0, engine

    def _get(self, refs: list[Any], afd: AFDConfig, names: list[str],
             deadline_s: float) -> list[Any]:
        """Results of calls to freshly created actors, by ``deadline_s``; an actor that could
        not start is one clear startup error."""
        ray = self._ray
        try:
            return list(ray.get(refs, timeout=max(deadline_s - time.monotonic(), 0.0)))
        except ray.exceptions.GetTimeoutError as e:
            raise WorkerStartupError(
                f"Ray actors did not start within {afd.startup_timeout_s:g} s"
            ) from e
        except ray.exceptions.RayError as e:
            bad = next((n for n, r in zip(names, refs, strict=True) if _failed(ray, r)), "a worker")
            raise WorkerStartupError(
                f"{bad.split('.')[0]}: its Ray actor failed to start: {_brief(e)}"
            ) from e

    @property
    def attention(self) -> list[WorkerConfig]:
        return [c for c in self.configs if c.role == "attention"]

    def exited(self) -> str | None:
        """A line naming a worker whose actor has finished or died, if any (checked at most
        every ``_HEALTH_CHECK_S``; a finding is kept)."""
        now = time.monotonic()
        if self._exited is not None or not self._runs or now - self._checked_at < _HEALTH_CHECK_S:
            return self._exited
        self._checked_at = now
        ray = self._ray
        done, _ = ray.wait(list(self._runs), num_returns=len(self._runs), timeout=0,
                           fetch_local=False)
        if not done:
            return None
        name = self._runs[done[0]].split(".")[0]
        try:
            code = ray.get(done[0], timeout=5)
            self._exited = f"worker {name} exited (code {code})"
        except ray.exceptions.RayActorError as e:
            self._exited = f"worker {name} died ({_actor_death(e)})"
        except ray.exceptions.RayError as e:
            self._exited = f"worker {name} failed: {_brief(e)}"
        return self._exited

    def kill(self) -> None:
        """Kill every actor and remove the placement group, and wait until both are gone
        (at most ``_RELEASE_TIMEOUT_S``): ``ray.kill`` and the group's removal only start
        that, and a new generation asking for the same resources meanwhile (on a cluster
        just big enough, all of them) would queue behind its own predecessor. Safe to call
        twice (and after Ray itself has shut down)."""
        for actor in self.actors.values():
            with contextlib.suppress(Exception):
                self._ray.kill(actor, no_restart=True)
        self.actors.clear()
        pg, self._pg = self._pg, None
        if pg is not None:
            with contextlib.suppress(Exception):
                self._remove_placement_group(pg)
        runs, self._runs = list(self._runs), {}
        untrack(self)
        left = self._await_release(runs, pg, time.monotonic() + _RELEASE_TIMEOUT_S)
        if left:
            logger.warning("Ray has not released %s %g s after the pool was killed; a new "
                           "pool may wait for their resources", left, _RELEASE_TIMEOUT_S)

    def _await_release(self, runs: list[Any], pg: Any, deadline_s: float) -> str | None:
        """None once every actor's ``run`` has ended (each ends with its actor) and ``pg``
        is removed; else what is still held at ``deadline_s``."""
        ray = self._ray
        try:
            if runs:
                _, pending = ray.wait(runs, num_returns=len(runs), fetch_local=False,
                                      timeout=max(deadline_s - time.monotonic(), 0.0))
                if pending:
                    return f"{len(pending)} actor(s)"
            while pg is not None and _pg_state(ray, pg) not in ("REMOVED", None):
                if time.monotonic() > deadline_s:
                    return "the placement group"
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - Ray shut down: nothing is held any more
            return None
        return None


def _name(rank: int, afd: AFDConfig, generation: int) -> str:
    attention = rank < afd.attention_workers
    index = rank if attention else rank - afd.attention_workers
    return f"{'attn' if attention else 'ffn'}{index}.g{generation}"


def _pg_state(ray: Any, pg: Any) -> str | None:
    """The placement group's state in the GCS (``CREATED``, ``REMOVED``, ...), None if the
    GCS does not know it."""
    table = ray.util.placement_group_table(pg)
    return table.get("state") if table else None


def _free(ray: Any) -> dict[str, float]:
    with contextlib.suppress(Exception):
        free = ray.available_resources()
        return {k: v for k, v in free.items() if k in ("CPU", "GPU")}
    return {}


def _failed(ray: Any, ref: Any) -> bool:
    done, _ = ray.wait([ref], timeout=0)
    if not done:
        return False
    try:
        ray.get(ref, timeout=0)
    except Exception:
        return True
    return False


def _actor_death(error: BaseException) -> str:
    text = str(error)
    if "killed by `ray.kill`" in text or "ray.kill" in text:
        return "its Ray actor was killed"
    if "unexpectedly" in text or "exit" in text.lower():
        return "its Ray actor's process exited"
    return "its Ray actor died"
