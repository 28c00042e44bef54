"""The FastAPI app: routes, request parsing and OpenAI-shaped errors."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tessera.serve.chat import create_chat_completion
from tessera.serve.completions import create_completion
from tessera.serve.errors import APIError, error_body, error_response, internal_error_message
from tessera.serve.middleware import APIKeyMiddleware, BodyLimitMiddleware
from tessera.serve.openai_models import ChatCompletionRequest, CompletionRequest
from tessera.serve.state import ServerState
from tessera.serve.tokenization import (
    DetokenizeRequest,
    TokenizeRequest,
    detokenize,
    tokenize,
)

BodyT = TypeVar("BodyT", bound=BaseModel)


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    errors = exc.errors(include_url=False)
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    loc = [str(p) for p in first.get("loc", ())]
    if not loc and first.get("type") == "model_type":
        return "the request body must be a JSON object", None
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value"))
    return (f"{param}: {msg}" if param else msg), param


async def parse_body(request: Request, model: type[BodyT]) -> BodyT:
    """The request's JSON body as ``model``: 400 naming the first bad field otherwise.

    Parsed by pydantic's own JSON reader, which bounds nesting depth and refuses ``NaN`` and
    ``Infinity`` (neither is JSON); the body's size is already bounded by the middleware.
    """
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        message, param = _validation_message(e)
        raise APIError(400, message, param) from None


def build_app(state: ServerState) -> FastAPI:
    """The app over already started engine clients, one per served model."""
    config = state.config
    app = FastAPI(title="Tessera", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tessera = state
    # The last added runs first: the key is checked before a byte of the body is read.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=config.max_request_body_bytes,
        timeout_s=config.request_body_timeout_s,
    )
    if config.api_key is not None:
        app.add_middleware(
            APIKeyMiddleware, api_key=config.api_key, protect_metrics=config.metrics_require_key
        )

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code)

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(500, internal_error_message(exc)), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        dead = [m.name for m in state.models if not m.client.alive]
        if dead:
            names = ", ".join(repr(n) for n in dead)
            return JSONResponse(error_body(503, f"the engine core of {names} is not running"), 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/kv_events")
    async def kv_events(model: str | None = None, since: int | None = None) -> dict[str, Any]:
        """What the model's device cache stored and evicted after feed batch ``since`` (the
        whole cache without it): prefix keys as ``tessera.kv.events`` defines them."""
        served = state.model(model)
        seq, events = served.client.kv_feed.since(since)
        return {"seq": seq, "block_size": served.client.engine_config.cache.block_size,
                "cleared": events.cleared, "stored": events.stored, "removed": events.removed}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [m.card() for m in state.models]}

    # ``:path``: model ids may hold slashes ("org/name").
    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        return state.model(model_id).card()

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        body = await parse_body(request, CompletionRequest)
        return await create_completion(body, request, state.model(body.model))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        body = await parse_body(request, ChatCompletionRequest)
        return await create_chat_completion(body, request, state.model(body.model))

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> dict[str, Any]:
        body = await parse_body(request, TokenizeRequest)
        return await tokenize(body, state.model(body.model))

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> dict[str, Any]:
        body = await parse_body(request, DetokenizeRequest)
        return await detokenize(body, state.model(body.model))

    return app
