"""The one error type a request can end in, raised by services and rendered by the API's handler."""

from __future__ import annotations


class ServiceError(Exception):
    """A refusal the client must see: rendered as OpenAI's ``{"error": {...}}`` with ``status``."""

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


def not_found(kind: str, id_: str, param: str | None = None) -> ServiceError:
    return ServiceError(404, f"No {kind} found with id '{id_}'", param=param, code=f"{kind}_not_found")


def conflict(message: str, code: str = "invalid_state") -> ServiceError:
    return ServiceError(409, message, code=code)
