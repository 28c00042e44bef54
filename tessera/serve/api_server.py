"""The FastAPI app: routes, API-key check and OpenAI-shaped errors."""

from __future__ import annotations

import hmac
import sys
import traceback
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from tessera.serve.chat import create_chat_completion
from tessera.serve.completions import create_completion
from tessera.serve.errors import APIError, error_body, error_response
from tessera.serve.openai_models import ChatCompletionRequest, CompletionRequest
from tessera.serve.state import ServerState


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value"))
    return (f"{param}: {msg}" if param else msg), param


class _APIKeyMiddleware:
    """Refuse ``/v1/*`` requests without ``Authorization: Bearer KEY`` before the body is read.

    Plain ASGI (not BaseHTTPMiddleware), so streaming and disconnect detection pass through.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(auth.strip(), self.expected):
                err = APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')")
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(state: ServerState) -> FastAPI:
    """The app over an already started engine client."""
    app = FastAPI(title="Tessera", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tessera = state
    if state.config.api_key is not None:
        app.add_middleware(_APIKeyMiddleware, api_key=state.config.api_key)

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code)

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        traceback.print_exception(exc, file=sys.stderr)
        return JSONResponse(error_body(500, f"internal error: {exc}"), status_code=500)

    def check_model(model: str | None) -> None:
        name = state.config.served_model_name
        if model is not None and model != name:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {name!r}",
                param="model",
            )

    @app.get("/health")
    async def health() -> JSONResponse:
        if not state.client.alive:
            return JSONResponse(error_body(503, "the engine core is not running"), 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": state.config.served_model_name,
            "object": "model",
            "created": state.created_s,
            "owned_by": "tessera",
            "root": state.client.engine_config.model,
            "max_model_len": state.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", response_model=None)
    async def completions(
        body: CompletionRequest, request: Request
    ) -> JSONResponse | StreamingResponse:
        check_model(body.model)
        return await create_completion(body, request, state)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request
    ) -> JSONResponse | StreamingResponse:
        check_model(body.model)
        return await create_chat_completion(body, request, state)

    return app
