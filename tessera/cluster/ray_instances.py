"""Instances as Ray actors, on any node of a Ray cluster (``instances_ray_address``).

An actor runs the same engine-core main as a local instance process, with TCP sockets: the
core binds its input on a free port of its node, and connects its output to the front's, which
listens on the front's node IP. Both are CURVE sockets that admit only each other
(``tessera.serve.curve``); the keys reach the actor as a call argument. Each actor asks for its
instance's threads as CPUs, and actors are spread over the nodes. Ray ends an owner's actors
when the owner (the front) dies, so a core on Ray has no parent check.

``RayProcess`` stands in for the ``subprocess.Popen`` of a local instance (``pid``, ``poll``,
``kill``, ``wait``), so ``InstanceProcess`` and the front treat both alike.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import time
from typing import Any

import msgspec
import zmq

from tessera.afd.ray_launcher import connect, node_ip
from tessera.config import EngineConfig
from tessera.messages.core import CoreConfig, CurveKeys
from tessera.serve.curve import Gate, as_client, as_server, new_keys

_CHECK_EVERY_S = 0.1


class _InstanceActor:
    """An instance's home on its node."""

    def where(self) -> tuple[str, str, int]:
        """Node IP, node id and process id of this actor."""
        import ray

        return (str(ray.util.get_node_ip_address()), str(ray.get_runtime_context().get_node_id()),
                os.getpid())

    def free_port(self, ip: str) -> int:
        with socket.socket() as s:
            s.bind((ip, 0))
            return int(s.getsockname()[1])

    def run(self, config_json: bytes) -> int:
        """The engine-core main, as ``python -m tessera.serve.engine_core`` runs it (looked
        up by name: the core builds engines, and a cluster is one of them)."""
        core = importlib.import_module("tessera.serve.engine_core")
        return int(core.main([config_json.decode()]))


class RayProcess:
    """The actor of one instance start, seen as a process."""

    def __init__(self, ray: Any, actor: Any, run_ref: Any, pid: int, node_id: str) -> None:
        self._ray = ray
        self._actor = actor
        self._run = run_ref
        self.pid = pid
        self.node_id = node_id
        self.returncode: int | None = None
        self._checked_s = 0.0

    def poll(self) -> int | None:
        """The exit code once the actor's run has ended or the actor died (-9), else None;
        asked of Ray at most every ``_CHECK_EVERY_S``."""
        if self.returncode is not None:
            return self.returncode
        now = time.monotonic()
        if now - self._checked_s < _CHECK_EVERY_S:
            return None
        self._checked_s = now
        done, _ = self._ray.wait([self._run], timeout=0, fetch_local=False)
        if done:
            try:
                self.returncode = int(self._ray.get(done[0], timeout=5))
            except Exception:  # the actor died: its process was killed or its node lost
                self.returncode = -9
            self.kill()  # a run that ended leaves an actor holding its CPUs: end it too
        return self.returncode

    def kill(self) -> None:
        """End the actor (and so its process); its CPUs go back to the cluster."""
        with contextlib.suppress(Exception):
            self._ray.kill(self._actor, no_restart=True)
        self.returncode = -9 if self.returncode is None else self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self.poll() is None:
            if time.monotonic() > deadline:
                import subprocess

                raise subprocess.TimeoutExpired("ray actor", timeout or 0.0)
            time.sleep(_CHECK_EVERY_S)
        assert self.returncode is not None
        return self.returncode


class RayFront:
    """The front's end of Ray instances: its CURVE keys and ZAP gate, on its context."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.ray = connect(address)
        self.ip = node_ip(address)
        self.public, self.secret = new_keys()
        self.gate = Gate(ctx, set())
        self.actor_cls = self.ray.remote(_InstanceActor)

    def start(self, ctx: zmq.Context, engine: EngineConfig, timeout_s: float,
              ) -> tuple[RayProcess, zmq.Socket, zmq.Socket]:
        """Start one instance actor; its process and the front's (input, output) sockets."""
        ray = self.ray
        actor = self.actor_cls.options(num_cpus=engine.num_threads or 1, max_restarts=0,
                                       scheduling_strategy="SPREAD").remote()
        try:
            ip, node_id, pid = ray.get(actor.where.remote(), timeout=timeout_s)
            port = ray.get(actor.free_port.remote(ip), timeout=timeout_s)
        except Exception as e:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
            raise ValueError(f"a Ray instance actor did not start within {timeout_s:g} s "
                             f"({type(e).__name__})") from e
        core_public, core_secret = new_keys()
        self.gate.allowed.add(core_public)
        output = ctx.socket(zmq.PULL)
        as_server(output, self.public, self.secret)
        out_port = output.bind_to_random_port(f"tcp://{self.ip}")
        inputs = ctx.socket(zmq.PUSH)
        inputs.setsockopt(zmq.SNDHWM, 0)
        inputs.setsockopt(zmq.LINGER, 0)
        as_client(inputs, self.public, self.secret, core_public)
        inputs.connect(f"tcp://{ip}:{port}")  # queues until the core binds
        config = CoreConfig(engine, f"tcp://{ip}:{port}", f"tcp://{self.ip}:{out_port}", 0,
                            instance=True,
                            curve=CurveKeys(core_public, core_secret, self.public))
        run = actor.run.remote(msgspec.json.encode(config))
        return RayProcess(ray, actor, run, pid, node_id), inputs, output

    def close(self) -> None:
        self.gate.stop()
