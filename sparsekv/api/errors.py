"""Errors in the OpenAI envelope `{"error": {"message", "type", "param", "code"}}`.

Every failure, whatever raised it, leaves the server in this one shape (with vLLM's habit of
putting the HTTP status in `code`), so clients' error handling works unchanged.
"""
from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from sparsekv.engine.async_engine import EngineError, EngineOverloaded, EngineUnavailable

logger = logging.getLogger(__name__)

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               405: "MethodNotAllowedError", 413: "RequestTooLargeError", 429: "RateLimitError",
               500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def to_api_error(e: Exception) -> APIError:
    """The HTTP meaning of an exception raised while serving a request."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineOverloaded):
        return APIError(429, str(e))
    if isinstance(e, EngineUnavailable):
        return APIError(503, str(e))
    if isinstance(e, ValueError):  # the engine's and SamplingParams' word for invalid input
        return APIError(400, _compact(str(e)))
    if isinstance(e, EngineError):
        return APIError(500, str(e))
    logger.error("unexpected error while serving a request", exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}")


def sse_error(e: Exception) -> str:
    """An error after a stream started: one `data:` event, then the caller sends [DONE]."""
    err = to_api_error(e)
    return f"data: {json.dumps(error_body(err.status, err.message, err.param))}\n\n"


def _compact(message: str) -> str:
    """One line from a multi-line (pydantic) message, without its links and input echoes."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip() and "errors.pydantic.dev" not in ln]
    return re.sub(r"\s*\[type=[^\]]*\]", "", " ".join(lines)) or "invalid request"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """Short, path-free text for pydantic errors, and the dotted name of the first bad field."""
    parts, param = [], None
    for err in exc.errors()[:5]:
        if err.get("type") == "json_invalid":
            return f"the body is not valid JSON: {err.get('ctx', {}).get('error', 'decode error')}", None
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        field = ".".join(loc) or None
        param = param or field
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        parts.append(f"{field}: {msg}" if field else msg)
    return "; ".join(parts) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    """400 for validation (never FastAPI's 422), envelopes for HTTP errors and crashes."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404:
            message = f"not found: {request.method} {request.url.path}"
        return error_response(exc.status_code, message)

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        return error_response(err.status, err.message, err.param)
