"""How ``gpt serve`` answers errors: OpenAI's error object, with the right status.

A bad request (a body that fails its checks, text the tokenizer cannot encode)
is a 400; a full queue a 429; a plugin's fault (its tokenizer or template
raised) a 500 ``server_error`` whose one line is also printed for the operator,
and in a stream already under way it is the last event.
"""

from __future__ import annotations

import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanogpt_core.errors import NanoGPTError, PluginFault
from nanogpt_core.generate.serve_generation import GenerationFailed, QueueFull


class APIError(Exception):
    """An error answered with OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def fields(self) -> dict[str, Any]:
        """OpenAI's error object: ``{"message", "type", "param", "code"}``."""
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def response(self) -> JSONResponse:
        """The HTTP response: ``{"error": fields}``."""
        return JSONResponse({"error": self.fields()}, status_code=self.status)


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error as OpenAI does: ``{"error": {...}}`` with its status."""

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(QueueFull)
    async def busy(_request: Request, exc: QueueFull) -> JSONResponse:
        return APIError(429, str(exc), type="rate_limit_error", code="queue_full").response()

    @app.exception_handler(NanoGPTError)
    async def bad_text(_request: Request, exc: NanoGPTError) -> JSONResponse:
        return APIError(400, str(exc)).response()

    @app.exception_handler(PluginFault)
    async def plugin_fault(_request: Request, exc: PluginFault) -> JSONResponse:
        return server_fault(exc).response()

    @app.exception_handler(GenerationFailed)
    async def generation_failed(_request: Request, exc: GenerationFailed) -> JSONResponse:
        return server_fault(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()


def server_fault(exc: PluginFault | GenerationFailed) -> APIError:
    """A plugin's fault or one request's failed generation: a 500, and its line for the operator."""
    print(f"Error: {exc}", file=sys.stderr, flush=True)
    return APIError(500, str(exc), type="server_error")


def _validation_error(exc: RequestValidationError) -> APIError:
    """The first problem of a request body as OpenAI's 400 error."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if param and not message.startswith(f"{param}:"):
        message = f"{param}: {message}"
    return APIError(400, message, param=param or None)
