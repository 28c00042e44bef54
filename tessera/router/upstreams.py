"""The running servers behind ``tessera router``: which are up, which models each serves, and
which prefix blocks each holds (followed from its ``GET /kv_events`` feed).

Every instance is polled each ``poll_interval_s``: ``/health``, its models now and then, and
the KV events of each model since the last batch seen. Their answers are input like any other:
bounded in size, decoded strictly, and an instance that answers wrongly or not at all is down
until it answers well again. Placement itself is :class:`tessera.cluster.router.Router`, one
per model, the same as for ``--data-parallel`` instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import httpx
import msgspec

from tessera.cluster.router import Router
from tessera.kv.events import KVEvents
from tessera.router.config import RouterConfig

logger = logging.getLogger(__name__)

MAX_REPLY_BYTES = 64 << 20
"""Largest answer of an instance to the router's own calls (a KV snapshot of ~2M blocks)."""
MODELS_EVERY_S = 10.0
"""How often an up instance is asked again which models it serves."""
MAX_MODELS = 64


class _Models(msgspec.Struct):
    data: list[dict[str, Any]]
    """Model cards, each with an ``id`` (kept whole for the router's ``/v1/models``)."""


class _KVReply(msgspec.Struct):
    seq: int
    block_size: int
    cleared: bool
    stored: list[int]
    removed: list[int]


class Upstream:
    """One server: its URL and what the router knows of it."""

    def __init__(self, url: str, role: str) -> None:
        self.url = url
        self.role = role
        self.up = False
        self.models: list[str] = []
        self.cards: dict[str, dict[str, object]] = {}
        self.models_at_s = 0.0
        self.kv_seq: dict[str, int | None] = {}
        self.error: str | None = None


class Upstreams:
    """The instances of a router, polled; ``routers`` places requests per model."""

    def __init__(self, config: RouterConfig, client: httpx.AsyncClient) -> None:
        self.config = config
        self.client = client
        self.items = [Upstream(url, role) for url, role in zip(config.urls, config.roles,
                                                               strict=True)]
        self.routers: dict[str, Router] = {}
        headers = {}
        if config.upstream_api_key:
            headers["Authorization"] = f"Bearer {config.upstream_api_key}"
        self._headers = headers
        self._timeout = httpx.Timeout(max(2.0, 10 * config.poll_interval_s),
                                      connect=config.connect_timeout_s)

    # ------------------------------------------------------------------ queries
    def serving(self, model: str, role: str | None = None) -> list[int]:
        """Indices of the up instances that serve ``model`` (in ``role``, if given)."""
        return [i for i, u in enumerate(self.items)
                if u.up and model in u.models and role in (None, u.role)]

    def model_names(self) -> list[str]:
        """Every model some up instance serves, in the order first seen."""
        names: dict[str, None] = {}
        for u in self.items:
            if u.up:
                names.update(dict.fromkeys(u.models))
        return list(names)

    def mark_down(self, i: int, reason: str) -> None:
        """Instance ``i`` failed a request or a poll: place nothing on it until it answers."""
        u = self.items[i]
        if u.up:
            logger.warning("instance %s is down: %s", u.url, reason)
        u.up, u.error = False, reason
        u.kv_seq.clear()  # its cache is unknown until a whole snapshot comes
        for router in self.routers.values():
            router.set_up(i, False)

    # ------------------------------------------------------------------ polling
    async def poll_forever(self) -> None:
        while True:
            started_s = time.monotonic()
            await asyncio.gather(*(self.poll(i) for i in range(len(self.items))))
            await asyncio.sleep(max(0.0, self.config.poll_interval_s
                                    - (time.monotonic() - started_s)))

    async def _get(self, url: str) -> bytes:
        async with self.client.stream("GET", url, headers=self._headers,
                                      timeout=self._timeout) as resp:
            if resp.status_code != 200:
                raise ValueError(f"GET {url} answered {resp.status_code}")
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > MAX_REPLY_BYTES:
                    raise ValueError(f"GET {url} answered over {MAX_REPLY_BYTES} bytes")
            return bytes(body)

    async def poll(self, i: int) -> None:
        """One round for instance ``i``; any failure marks it down (and is logged once)."""
        u = self.items[i]
        try:
            await self._get(f"{u.url}/health")
            now_s = time.monotonic()
            if not u.up or now_s - u.models_at_s > MODELS_EVERY_S:
                cards = msgspec.json.decode(await self._get(f"{u.url}/v1/models"),
                                            type=_Models).data[:MAX_MODELS]
                if not all(isinstance(c.get("id"), str) for c in cards):
                    raise ValueError(f"{u.url}/v1/models lists a model without an id")
                u.cards = {c["id"]: c for c in cards}
                u.models = list(u.cards)
                u.models_at_s = now_s
            for model in u.models:
                await self._follow(i, model)
        except (httpx.HTTPError, ValueError, msgspec.DecodeError, TypeError, KeyError) as exc:
            self.mark_down(i, str(exc) or type(exc).__name__)
            return
        if not u.up:
            logger.info("instance %s is up (models: %s)", u.url, ", ".join(u.models))
        u.up, u.error = True, None
        for model, router in self.routers.items():
            router.set_up(i, model in u.models)

    async def _follow(self, i: int, model: str) -> None:
        """Apply instance ``i``'s KV events of ``model`` since the last batch seen."""
        u = self.items[i]
        since = u.kv_seq.get(model)
        query = {"model": model} | ({} if since is None else {"since": str(since)})
        url = httpx.URL(f"{u.url}/kv_events", params=query)
        reply = msgspec.json.decode(await self._get(str(url)), type=_KVReply)
        if not 1 <= reply.block_size <= 1 << 16:
            raise ValueError(f"block_size {reply.block_size} out of range")
        router = self.routers.get(model)
        if router is None:
            router = Router(len(self.items), reply.block_size,
                            self.config.cluster.router_policy,
                            self.config.cluster.router_overlap_weight,
                            self.config.cluster.router_load_weight)
            for k, other in enumerate(self.items):
                router.set_up(k, other.up and model in other.models)
            self.routers[model] = router
        router.index.apply(i, KVEvents(reply.stored, reply.removed, reply.cleared))
        u.kv_seq[model] = reply.seq

    async def stop(self, task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
