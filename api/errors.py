"""One error type, mapped by one handler to OpenAI's error shape."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

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


class APIError(Exception):
    """Raised anywhere in a request; rendered as ``{"error": {...}}`` with its status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}


def not_found(kind: str, id_: str, param: str | None = None) -> APIError:
    return APIError(404, f"No {kind} found with id '{id_}'", param=param, code=f"{kind}_not_found")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def conflict(message: str, code: str = "invalid_state") -> APIError:
    return APIError(409, message, code=code)


def error_body(status: int, message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _render(exc: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.status, exc.message, exc.type, exc.param, exc.code),
        status_code=exc.status,
        headers=exc.headers,
    )


_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error"}


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _render(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return _render(APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = _HTTP_TYPES.get(exc.status_code, "invalid_request_error")
        return _render(APIError(exc.status_code, str(exc.detail), type_=type_))

    @app.exception_handler(OperationalError)
    async def _db_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", exc.orig)
        return _render(APIError(503, "The database is unavailable; retry shortly.", type_="server_error",
                                code="database_unavailable", headers={"Retry-After": "5"}))

    @app.exception_handler(DBAPIError)
    async def _db_error(_: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            return _render(APIError(503, "The database connection was lost; retry shortly.",
                                    type_="server_error", code="database_unavailable",
                                    headers={"Retry-After": "5"}))
        log.exception("database error")
        return _render(APIError(500, "Internal error", type_="server_error"))

    @app.exception_handler(ValueError)
    async def _nul(_: Request, exc: ValueError) -> JSONResponse:
        # Postgres text cannot hold NUL; psycopg2 refuses such a value before sending it. Bad input, not ours.
        if "NUL (0x00)" in str(exc):
            return _render(APIError(400, "strings must not contain NUL (0x00) characters", code="invalid_value"))
        log.exception("unhandled error")
        return _render(APIError(500, "Internal error", type_="server_error"))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _render(APIError(500, "Internal error", type_="server_error"))


def error_response(status: int, message: str, type_: str, param: str | None, code: str | None) -> JSONResponse:
    return JSONResponse(error_body(status, message, type_, param, code), status_code=status)
