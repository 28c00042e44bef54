"""Helpers for the server tests: a tiny chat-capable model and a server subprocess.

(No tests here; the name keeps it with the other server test files.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import httpx

from tests.models import build_model

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SERVER_ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


def build_server_model(out: Path, chat_template: bool = True) -> Path:
    """A tiny random Llama with the byte tokenizer (4096 positions, so long streams take a
    while) and, optionally, a chat template in tokenizer_config.json."""
    path, _ = build_model("llama", out, max_position_embeddings=4096)
    if chat_template:
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = CHAT_TEMPLATE
        cfg_path.write_text(json.dumps(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (Linux /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


def terminate(proc: subprocess.Popen, close_streams: bool = True) -> None:
    """SIGTERM, SIGKILL after 20 s, then (by default) close its pipes."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if close_streams:
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


class ServerProcess:
    """``tessera serve`` in a subprocess on a free port; ``stop()`` leaves nothing behind.

    ``model`` None: the models come from ``extra`` (``--model``, ``--config``)."""

    def __init__(
        self, model: Path | None, *extra: str, name: str | None = "tiny",
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.name = name
        first = [str(model), *(["--served-model-name", name] if name else [])] if model else []
        cmd = [
            sys.executable, "-m", "tessera.cli", "serve", *first, "--port", str(self.port),
            "--dtype", "float32", "--device", "cpu", "--threads", "1",
            "--kv-cache-memory", str(16 << 20), *extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, env=SERVER_ENV | (env or {}), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        self.core_pid: int | None = None
        self.core_pids: list[int] = []
        """Every engine core at start (one per served model)."""

    def wait_ready(self, timeout_s: float = 90.0) -> ServerProcess:
        deadline_s = time.monotonic() + timeout_s
        while time.monotonic() < deadline_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    kids = child_pids(self.proc.pid)
                    self.core_pid = kids[0] if kids else None
                    self.core_pids = kids
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become healthy")

    def current_core_pid(self) -> int | None:
        """The engine core now running (it changes when the server restarts it)."""
        kids = child_pids(self.proc.pid)
        return kids[0] if kids else None

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.base_url}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL for anything (server or core) still running."""
        cores = {self.core_pid, *self.core_pids,
                 *(child_pids(self.proc.pid) if self.proc.poll() is None else [])}
        terminate(self.proc, close_streams=False)
        for pid in cores:
            if pid is not None and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


# Generous client timeouts: a loaded CI machine must not turn a slow answer into a failure.
# Tests that check a timeout on purpose pass their own.
HTTP_TIMEOUT_S = 60.0
http = SimpleNamespace(
    get=partial(httpx.get, timeout=HTTP_TIMEOUT_S),
    post=partial(httpx.post, timeout=HTTP_TIMEOUT_S),
    stream=partial(httpx.stream, timeout=HTTP_TIMEOUT_S),
)

