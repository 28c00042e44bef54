"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi.responses import JSONResponse

logger = logging.getLogger("tessera.serve")

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """Raised by handlers; turned into an OpenAI-shaped JSON response by the app."""

    def __init__(
        self,
        status_code: int,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.headers = headers
        self.code = code
        """OpenAI's machine-readable code where it has one (``model_not_found``); else the
        status code."""


def error_body(
    status_code: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status_code, "APIError"),
            "param": param,
            "code": status_code if code is None else code,
        }
    }


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(err.status_code, err.message, err.param, err.code),
        status_code=err.status_code,
        headers=err.headers,
    )


def internal_error_message(exc: BaseException) -> str:
    """Log an unexpected exception with its traceback and a fresh id; the client's message
    names only the id, never the exception's text (it may hold paths or internals)."""
    error_id = uuid.uuid4().hex[:12]
    logger.error("internal error %s", error_id, exc_info=exc)
    return f"internal server error (id {error_id}; the server log has the details)"
