"""The router's HTTP app: OpenAI's completions and chat endpoints, each request placed on one
of the running servers (``Upstreams``) and relayed back.

A request is read whole (bounded) and parsed only for what placement needs (``model``, the
prompt or messages, ``stream``); the instance gets the body unchanged. Under the ``kv`` policy
the prompt's token ids come from the ``/tokenize`` of an instance of the model (a chat rendered
by its template, exactly as it will be served), and the instance of least cost takes it.

Failures: an instance that cannot be reached, or that answers 5xx before any byte reached the
client, is marked down and the request goes to another (``max_request_retries``). A whole
(non-streaming) answer is read before it is relayed, so it is retried even when its instance
dies mid-request; a stream that breaks mid-way ends with an error event, never silently short.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from tessera.cluster.router import Router
from tessera.router.config import RouterConfig
from tessera.router.upstreams import Upstreams
from tessera.serve.errors import APIError, error_body, error_response

FORWARDED_REQUEST_HEADERS = ("authorization", "content-type", "x-request-id", "x-session-id")
MAX_SESSION_CHARS = 256
FORWARDED_RESPONSE_HEADERS = ("content-type", "retry-after", "x-request-id")
BROKEN_STREAM = (b'data: {"error": {"message": "the instance serving this request failed '
                 b'mid-stream", "type": "InternalServerError", "param": null, "code": 502}}'
                 b"\n\n")


class RouterMetrics:
    def __init__(self, urls: tuple[str, ...]) -> None:
        self.registry = CollectorRegistry()
        self.urls = urls
        self.routed = Counter("tessera:router_routed_requests", "requests placed, per instance",
                              ["instance"], registry=self.registry)
        self.hit_tokens = Counter("tessera:router_hit_tokens",
                                  "prompt tokens placed where the router knew them cached",
                                  ["instance"], registry=self.registry)
        self.retries = Counter("tessera:router_retries", "requests placed again after their "
                               "instance failed", registry=self.registry)
        self.prefills = Counter("tessera:router_prefills", "prompts computed on a prefill "
                                "instance before their decode instance took them, by outcome",
                                ["outcome"], registry=self.registry)
        self.up = Gauge("tessera:instance_up", "1 while the instance answers its polls",
                        ["instance"], registry=self.registry)


class RouterState:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(
            config.request_timeout_s, connect=config.connect_timeout_s))
        self.upstreams = Upstreams(config, self.client)
        self.metrics = RouterMetrics(config.urls)

    def router_for(self, model: str | None) -> tuple[str, Router]:
        names = self.upstreams.model_names()
        if model is None:
            if len(names) != 1:
                raise APIError(400, "model is required: the instances serve "
                               f"{', '.join(names) or 'nothing yet'}", param="model")
            model = names[0]
        router = self.upstreams.routers.get(model)
        if model not in names or router is None:
            if not any(u.up for u in self.upstreams.items):
                raise APIError(503, "no instance behind the router is up",
                               headers={"Retry-After": "1"})
            raise APIError(404, f"The model `{model}` does not exist.", param="model",
                           code="model_not_found")
        return model, router

    async def prompt_ids(self, model: str, path: str, payload: dict[str, Any],
                         headers: dict[str, str]) -> list[int]:
        """The prompt's token ids as an instance of ``model`` sees them; [] when that cannot
        be had (the request is then placed by load alone)."""
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list | str):
            prompt = prompt[0]  # a batch of prompts is placed by its first
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return prompt
        body: dict[str, Any] = {"model": model}
        if path.endswith("/chat/completions"):
            if not isinstance(payload.get("messages"), list):
                return []
            body["messages"] = payload["messages"]
            if isinstance(payload.get("chat_template_kwargs"), dict):
                body["chat_template_kwargs"] = payload["chat_template_kwargs"]
        elif isinstance(prompt, str):
            body["prompt"] = prompt
        else:
            return []
        for i in self.upstreams.serving(model):
            try:
                resp = await self.client.post(f"{self.upstreams.items[i].url}/tokenize",
                                              json=body, headers=headers, timeout=10.0)
            except httpx.HTTPError:
                continue
            if resp.status_code == 200:
                tokens = resp.json().get("tokens")
                if isinstance(tokens, list) and all(isinstance(t, int) for t in tokens):
                    return tokens
            return []  # the request itself is bad; its instance will say so
        return []


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, at most ``limit`` bytes and within ``timeout_s`` (a client trickling a
    body would otherwise hold a connection and its memory for as long as it likes)."""
    body = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise APIError(413, f"request body over {limit} bytes")

    try:
        await asyncio.wait_for(read(), timeout_s)
    except TimeoutError as exc:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s") from exc
    return bytes(body)


def _forwarded(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() in FORWARDED_RESPONSE_HEADERS}


async def proxy(state: RouterState, request: Request, path: str) -> Response:
    """Place the request at ``path`` and relay its answer."""
    body = await _read_body(request, state.config.max_request_body_bytes,
                            state.config.request_body_timeout_s)
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model must be a string", param="model")
    model, router = state.router_for(model)
    headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_REQUEST_HEADERS}
    ids: list[int] = []
    if router.policy == "kv":
        ids = await state.prompt_ids(model, path, payload, headers)
    session = request.headers.get("x-session-id") or payload.get("user")
    if not isinstance(session, str) or len(session) > MAX_SESSION_CHARS:
        session = None
    role = None
    if state.config.prefill_instances:
        await _prefill(state, router, model, path, payload, headers, ids)
        role = "decode"
    tried: set[int] = set()
    retries = state.config.cluster.max_request_retries
    for attempt in range(retries + 1):
        among = [i for i in state.upstreams.serving(model, role) if i not in tried]
        try:
            placement = router.place(ids, among=among, session=session)
        except ValueError as exc:
            raise APIError(503, f"no instance of {model} could take the request: {exc}",
                           headers={"Retry-After": "1"}) from exc
        i, request_id = placement.instance, uuid.uuid4().hex
        url = state.upstreams.items[i].url
        router.started(request_id, placement)
        state.metrics.routed.labels(url).inc()
        state.metrics.hit_tokens.labels(url).inc(placement.num_hit_blocks * router.block_size)
        try:
            upstream = await state.client.send(
                state.client.build_request("POST", url + path, content=body, headers=headers),
                stream=True)
        except httpx.HTTPError as exc:
            router.ended(request_id)
            state.upstreams.mark_down(i, f"{type(exc).__name__}: {exc}")
            tried.add(i)
            state.metrics.retries.inc()
            continue
        if upstream.status_code >= 500 and attempt < retries:
            await upstream.aclose()
            router.ended(request_id)
            tried.add(i)
            state.metrics.retries.inc()
            continue
        if payload.get("stream") is True and upstream.status_code == 200:
            return StreamingResponse(_relay(upstream, router, request_id),
                                     status_code=upstream.status_code,
                                     headers=_forwarded(upstream.headers))
        try:
            content = await upstream.aread()
        except httpx.HTTPError as exc:
            state.upstreams.mark_down(i, f"{type(exc).__name__}: {exc}")
            tried.add(i)
            state.metrics.retries.inc()
            continue
        finally:
            await upstream.aclose()
            router.ended(request_id)
        return Response(content, status_code=upstream.status_code,
                        headers=_forwarded(upstream.headers))
    raise APIError(503, f"every instance tried for this request failed ({len(tried)})",
                   headers={"Retry-After": "1"})


PREFILL_DROPPED = ("stream_options", "logprobs", "top_logprobs", "prompt_logprobs", "echo",
                   "best_of", "suffix", "n", "max_completion_tokens")
"""Fields the prefill request goes without: it only has to compute the prompt."""


async def _prefill(state: RouterState, router: Router, model: str, path: str,
                   payload: dict[str, Any], headers: dict[str, str], ids: list[int]) -> None:
    """Have a prefill instance compute the prompt (and one token, dropped), so that its blocks
    are in the KV tier the decode instance shares with it. Best effort: when no prefill
    instance can, the decode instance computes the prompt itself (the same tokens either
    way)."""
    body = {k: v for k, v in payload.items() if k not in PREFILL_DROPPED}
    body |= {"max_tokens": 1, "stream": False}
    try:
        placement = router.place(ids, among=state.upstreams.serving(model, "prefill"))
    except ValueError:
        state.metrics.prefills.labels("no instance").inc()
        return
    i, request_id = placement.instance, uuid.uuid4().hex
    router.started(request_id, placement)
    try:
        resp = await state.client.post(state.upstreams.items[i].url + path, json=body,
                                       headers=headers)
        outcome = "done" if resp.status_code == 200 else f"status {resp.status_code}"
    except httpx.HTTPError as exc:
        state.upstreams.mark_down(i, f"{type(exc).__name__}: {exc}")
        outcome = "failed"
    finally:
        router.ended(request_id)
    state.metrics.prefills.labels(outcome).inc()


async def _relay(upstream: httpx.Response, router: Router, request_id: str
                 ) -> AsyncIterator[bytes]:
    try:
        first = True
        async for chunk in upstream.aiter_raw():
            if first:
                router.first_token(request_id)
                first = False
            yield chunk
    except httpx.HTTPError:
        yield BROKEN_STREAM
    finally:
        await upstream.aclose()
        router.ended(request_id)


def build_app(config: RouterConfig) -> FastAPI:
    state = RouterState(config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await asyncio.gather(*(state.upstreams.poll(i) for i in range(len(config.urls))))
        task = asyncio.create_task(state.upstreams.poll_forever())
        try:
            yield
        finally:
            await state.upstreams.stop(task)
            await state.client.aclose()

    app = FastAPI(title="Tessera router", lifespan=lifespan)
    app.state.router = state

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.get("/health")
    async def health() -> JSONResponse:
        up = sum(u.up for u in state.upstreams.items)
        if not up:
            return JSONResponse(error_body(503, "no instance behind the router is up"), 503)
        return JSONResponse({"status": "ok", "instances_up": up})

    @app.get("/metrics")
    async def metrics() -> Response:
        for u in state.upstreams.items:
            state.metrics.up.labels(u.url).set(1.0 if u.up else 0.0)
        return Response(generate_latest(state.metrics.registry),
                        media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cards: dict[str, Any] = {}
        for u in state.upstreams.items:
            if u.up:
                for name in u.models:
                    cards.setdefault(name, u.cards.get(name) or {"id": name, "object": "model"})
        return {"object": "list", "data": list(cards.values())}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        return await proxy(state, request, "/v1/completions")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        return await proxy(state, request, "/v1/chat/completions")

    return app
