"""One error type, mapped by one handler to OpenAI's error shape."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import ServiceError

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail


def _documented(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


# Documented on every route, so the OpenAPI schema tells clients what each error looks like.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _documented("Bad input; `param` names the field"),
    401: _documented("No key, or a bad or revoked key"),
    403: _documented("The key lacks the scope"),
    404: _documented("Unknown, or another tenant's"),
    409: _documented("Wrong state, or an idempotency key in flight"),
    413: _documented("Too large"),
    422: _documented("Idempotency key reused with another body"),
    503: _documented("Database or broker unreachable; see Retry-After"),
}


# The service layer's error is the API's: routers and services raise the same type.
APIError = ServiceError


class JSONBody(Response):
    """A JSON body rendered by orjson, for bodies built by hand (errors, inference answers).

    Routes with a response model are serialised by pydantic-core instead, which is faster still.
    """

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_body(status: int, message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def render(exc: APIError) -> JSONBody:
    """The response of an error, wherever it is raised or built (handlers, middleware)."""
    return JSONBody(
        error_body(exc.status, exc.message, exc.type, exc.param, exc.code),
        status_code=exc.status,
        headers=exc.headers,
    )


_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error"}


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONBody:
        return render(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONBody:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return render(APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONBody:
        type_ = _HTTP_TYPES.get(exc.status_code, "invalid_request_error")
        code = "request_too_large" if exc.status_code == 413 else None
        return render(APIError(exc.status_code, str(exc.detail), type_=type_, code=code))

    async def _db_down(_: Request, exc: Exception) -> JSONBody:
        log.warning("database unavailable: %s", exc)
        return render(APIError(503, "The database is unavailable; retry shortly.", type_="server_error",
                               code="database_unavailable", headers={"Retry-After": "5"}))

    # Postgres out of reach, however it shows: SQLAlchemy's OperationalError; the socket's own error, which
    # asyncpg raises when a new connection is refused or reset and SQLAlchemy passes through unwrapped
    # (nothing else the API does opens sockets this way); and asyncpg's refusal while Postgres starts up or
    # shuts down.
    for unreachable in (OperationalError, ConnectionError, asyncpg.exceptions.PostgresConnectionError):
        app.add_exception_handler(unreachable, _db_down)

    @app.exception_handler(DBAPIError)
    async def _db_error(_: Request, exc: DBAPIError) -> JSONBody:
        if exc.connection_invalidated:
            return render(APIError(503, "The database connection was lost; retry shortly.",
                                    type_="server_error", code="database_unavailable",
                                    headers={"Retry-After": "5"}))
        if _sqlstate(exc).startswith("22"):
            # A data exception: a value Postgres cannot store, such as a NUL character in text or JSON.
            # The client's input, not our fault, and nothing was written.
            return render(APIError(400, f"a value cannot be stored: {_first_line(exc.orig)}", code="invalid_value"))
        log.exception("database error")
        return render(APIError(500, "Internal error", type_="server_error"))

    @app.exception_handler(ValueError)
    async def _nul(_: Request, exc: ValueError) -> JSONBody:
        # Postgres text cannot hold NUL; psycopg2 refuses such a value before sending it. Bad input, not ours.
        if "NUL (0x00)" in str(exc):
            return render(APIError(400, "strings must not contain NUL (0x00) characters", code="invalid_value"))
        log.exception("unhandled error")
        return render(APIError(500, "Internal error", type_="server_error"))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONBody:
        log.exception("unhandled error")
        return render(APIError(500, "Internal error", type_="server_error"))


def _sqlstate(exc: DBAPIError) -> str:
    # asyncpg's adapted errors carry `sqlstate`, psycopg2's `pgcode`.
    return str(getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None) or "")


def _first_line(error: BaseException | None) -> str:
    return str(error).split("\n", 1)[0].split(": ", 1)[-1][:200]


def error_response(status: int, message: str, type_: str, param: str | None, code: str | None) -> JSONBody:
    return JSONBody(error_body(status, message, type_, param, code), status_code=status)
