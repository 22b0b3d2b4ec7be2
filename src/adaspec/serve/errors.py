"""Errors answered as OpenAI's {"error": {"message", "type", "param", "code"}}, and why a generation ended early."""

from __future__ import annotations

import json
import logging

from adaspec.core.errors import AdaspecError

log = logging.getLogger("adaspec.serve")


class ApiError(Exception):
    """An error answered as OpenAI's {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def json(self) -> bytes:
        """The body as ASCII JSON: a lone surrogate a client sent (echoed in a message) cannot break the encoding."""
        return json.dumps(self.body()).encode()


class Aborted(Exception):
    """A generation ended early: reason is 'disconnect', 'timeout' or 'shutdown'."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def unsupported(param: str, what: str) -> ApiError:
    return ApiError(400, f"'{param}' is not supported: {what}", param=param, code="unsupported_parameter")


def api_error(e: BaseException) -> ApiError:
    """The HTTP error a failed request answers with. Our errors say what to change (4xx); anything else is a bug of
    ours: logged with its traceback, answered 500 without details."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, AdaspecError):
        return ApiError(400, str(e))
    if isinstance(e, Aborted):
        if e.reason == "timeout":
            return ApiError(408, "the request ran past the server's timeout", "timeout_error", code="timeout")
        if e.reason == "shutdown":
            return ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
        return ApiError(499, "the client closed the request", code="client_closed")
    log.error("internal error", exc_info=e)
    return ApiError(500, "internal server error (the server's log has the details)", "server_error")
