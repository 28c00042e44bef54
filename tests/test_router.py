"""``tessera router`` in front of running servers: each server's ``/kv_events`` feed, requests
placed where their prefix is cached, answers relayed (whole and streamed), a killed instance
marked down while the other serves, and bad requests answered with OpenAI-style errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tessera.kv.events import KVEvents
from tessera.serve.kv_feed import MAX_KEPT_KEYS, KVFeed
from tests.test_serve_util import (
    SERVER_ENV,
    ServerProcess,
    build_server_model,
    free_port,
    terminate,
)


def test_feed_merges_batches_and_gives_a_snapshot_to_readers_behind() -> None:
    feed = KVFeed()
    assert feed.since(None) == (0, KVEvents([], [], True))
    feed.apply(KVEvents([1, 2, 3], [], True))
    feed.apply(KVEvents([4], [2]))
    feed.apply(KVEvents([], []))  # nothing changed: no batch
    assert feed.seq == 2
    seq, events = feed.since(1)
    assert seq == 2 and events == KVEvents([4], [2], False)
    assert feed.since(0)[1] == KVEvents([1, 3, 4], [2], True)
    assert feed.since(2)[1] == KVEvents([], [], False)
    # Ahead of the feed (a restarted server) or unknown: the whole cache.
    assert feed.since(7)[1] == KVEvents([1, 3, 4], [], True)
    feed.apply(KVEvents([9], [], True))  # a new core states its whole cache
    assert feed.since(2)[1] == KVEvents([9], [], True)
    # Far behind the kept batches: the whole cache, not a partial merge.
    for k in range(3):
        feed.apply(KVEvents(list(range(10 + k * MAX_KEPT_KEYS, 10 + (k + 1) * MAX_KEPT_KEYS))))
    seq, events = feed.since(1)
    assert events.cleared and len(events.stored) == 3 * MAX_KEPT_KEYS + 1


class RouterProcess:
    def __init__(self, *urls: str, extra: tuple[str, ...] = ()) -> None:
        """``tessera router`` over ``urls`` (``--instance``) and ``extra`` flags."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "tessera.cli", "router", "--port", str(self.port),
               "--poll-interval", "0.1", *(a for u in urls for a in ("--instance", u)), *extra]
        self.proc = subprocess.Popen(cmd, env=SERVER_ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def wait_up(self, num_up: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read()  # type: ignore[union-attr]
            try:
                r = httpx.get(f"{self.base_url}/health", timeout=2)
                if r.status_code == 200 and r.json()["instances_up"] == num_up:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the router did not see {num_up} instances up")

    def metric(self, name: str) -> dict[str, float]:
        """``name``'s value per instance label."""
        out = {}
        for line in httpx.get(f"{self.base_url}/metrics", timeout=5).text.splitlines():
            if line.startswith(name + "{"):
                label = line.split('instance="', 1)[1].split('"', 1)[0]
                out[label] = float(line.rsplit(" ", 1)[1])
        return out

    def stop(self) -> None:
        terminate(self.proc)


@pytest.mark.processes
def test_router_places_by_prefix_relays_and_survives_a_killed_instance(tmp_path) -> None:
    path = build_server_model(tmp_path / "m")
    servers = [ServerProcess(path) for _ in range(2)]
    router = None
    try:
        for s in servers:
            s.wait_ready(timeout_s=240)
        urls = [s.base_url for s in servers]
        router = RouterProcess(*urls, extra=("--request-body-timeout", "2"))
        router.wait_up(2)
        system = "You are a careful assistant who answers briefly. " * 6
        body = {"model": "tiny", "prompt": system + "Question one?", "max_tokens": 4,
                "temperature": 0, "ignore_eos": True}
        direct = httpx.post(f"{urls[0]}/v1/completions", json=body, timeout=120)
        routed = httpx.post(f"{router.base_url}/v1/completions", json=body, timeout=120)
        assert routed.status_code == 200, routed.text
        assert routed.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"]

        # The instance feeds its cache: the whole cache first, then changes since a batch.
        feed = httpx.get(f"{urls[0]}/kv_events", timeout=10).json()
        assert feed["cleared"] and feed["stored"] and feed["block_size"] == 16
        later = httpx.get(f"{urls[0]}/kv_events", params={"since": feed["seq"]},
                          timeout=10).json()
        assert later["stored"] == [] and not later["cleared"]
        assert httpx.get(f"{urls[0]}/kv_events", params={"since": "x"},
                         timeout=10).status_code in (400, 422)

        # Requests sharing the prefix go where it is cached (known from the feeds).
        def routed_counts() -> dict[str, float]:
            return router.metric("tessera:router_routed_requests_total")  # type: ignore[union-attr]

        time.sleep(0.5)  # nothing waits on it: the feeds are polled every 0.1 s
        before = routed_counts()
        for k in range(3):
            r = httpx.post(f"{router.base_url}/v1/completions",
                           json=body | {"prompt": system + f"Question {k + 2}?"}, timeout=120)
            assert r.status_code == 200, r.text
        after = routed_counts()
        grew = {u: after.get(u, 0) - before.get(u, 0) for u in urls}
        assert sorted(grew.values()) == [0, 3], grew
        assert sum(router.metric("tessera:router_hit_tokens_total").values()) >= 3 * 16

        # A stream is relayed as it comes, ending with [DONE].
        with httpx.stream("POST", f"{router.base_url}/v1/completions",
                          json=body | {"stream": True}, timeout=120) as r:
            lines = [x for x in r.iter_lines() if x.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) >= 5

        # Bad requests get OpenAI-style errors from the router itself.
        r = httpx.post(f"{router.base_url}/v1/completions", content=b"{nope", timeout=10)
        assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
        r = httpx.post(f"{router.base_url}/v1/completions", json=body | {"model": "other"},
                       timeout=10)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = httpx.post(f"{router.base_url}/v1/completions",
                       content=b"x" * (4 * 1024 * 1024 + 1), timeout=30)
        assert r.status_code == 413
        # A body that trickles in is cut off (the router runs with --request-body-timeout 2).
        with socket.create_connection(("127.0.0.1", router.port), timeout=30) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            reply = conn.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408"), reply
        # The instance's own errors come back as they are.
        r = httpx.post(f"{router.base_url}/v1/completions", json=body | {"max_tokens": -1},
                       timeout=30)
        assert r.status_code == 400 and "max_tokens" in r.text

        # Kill the instance that holds the prefix: the router marks it down, and the same
        # requests are answered by the other.
        holder = max(grew, key=lambda u: grew[u])
        victim = servers[urls.index(holder)]
        for pid in (victim.current_core_pid(), victim.proc.pid):
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
        for k in range(2):
            r = httpx.post(f"{router.base_url}/v1/completions",
                           json=body | {"prompt": system + f"After {k}?"}, timeout=120)
            assert r.status_code == 200, r.text
        router.wait_up(1)
        assert router.metric("tessera:instance_up") == {holder: 0.0,
                                                        next(u for u in urls if u != holder): 1.0}
        models = httpx.get(f"{router.base_url}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
    finally:
        if router is not None:
            router.stop()
        for s in servers:
            s.stop()


@pytest.mark.processes
def test_router_with_no_instance_up_answers_503_and_bad_flags_are_one_line() -> None:
    router = RouterProcess(f"http://127.0.0.1:{free_port()}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"{router.base_url}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert r.status_code == 503
        r = httpx.post(f"{router.base_url}/v1/completions",
                       content=json.dumps({"prompt": "hi"}), timeout=10)
        assert r.status_code in (400, 503) and "error" in r.json()
    finally:
        router.stop()
    for flags, message in ((["--instance", "nope"], "is not an http(s) URL"),
                           (["--instance", "http://a:1", "--instance", "http://a:1"],
                            "given twice"),
                           (["--instance", "http://a:1", "--poll-interval", "0"],
                            "poll_interval_s must be a positive number"),
                           (["--instance", "http://a:1", "--router-policy", "x"],
                            "invalid choice")):
        r = subprocess.run([sys.executable, "-m", "tessera.cli", "router", *flags],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


@pytest.mark.processes
def test_router_prefill_and_decode_servers_share_a_remote_kv_tier(tmp_path) -> None:
    """Across hosts: a prefill server computes the prompt, its blocks land in the remote KV
    tier (a Valkey both servers use), and the decode server loads them and generates; the
    text is a single server's."""
    from tests.test_kv_remote import Store

    path = build_server_model(tmp_path / "m")
    store = Store()
    store.start()
    servers = [ServerProcess(path, "--kv-store", store.url) for _ in range(2)]
    router = None
    try:
        for s in servers:
            s.wait_ready(timeout_s=240)
        prefill, decode = (s.base_url for s in servers)
        router = RouterProcess(extra=("--prefill-instance", prefill, "--decode-instance", decode))
        router.wait_up(2)
        prompt = "A long shared question about the weather in several cities. " * 5
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0,
                "ignore_eos": True}
        r = httpx.post(f"{router.base_url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        fresh = httpx.post(f"{prefill}/v1/completions",
                           json=body | {"prompt": prompt + " (again)"}, timeout=120)
        assert fresh.status_code == 200
        reference = ServerProcess(path)
        try:
            reference.wait_ready(timeout_s=240)
            expected = httpx.post(f"{reference.base_url}/v1/completions", json=body,
                                  timeout=120).json()["choices"][0]["text"]
        finally:
            reference.stop()
        assert r.json()["choices"][0]["text"] == expected
        # The decode server computed only what the tier did not hold.
        metrics = httpx.get(f"{decode}/metrics", timeout=5).text.splitlines()
        remote = [float(x.split()[-1]) for x in metrics
                  if x.startswith("tessera:kv_tier_hits_tokens_total{") and 'tier="remote"' in x]
        assert remote and remote[0] >= 16 * 10, metrics
        done = {line.split('outcome="')[1].split('"')[0]: float(line.split()[-1])
                for line in httpx.get(f"{router.base_url}/metrics", timeout=5).text.splitlines()
                if line.startswith("tessera:router_prefills_total{")}
        assert done == {"done": 1.0}
        # Streaming goes the same way.
        with httpx.stream("POST", f"{router.base_url}/v1/completions",
                          json=body | {"stream": True}, timeout=120) as s:
            lines = [x for x in s.iter_lines() if x.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
    finally:
        if router is not None:
            router.stop()
        for s in servers:
            s.stop()
        store.kill()
