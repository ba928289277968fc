"""Errors the server returns, all rendered in OpenAI's shape:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

Raise an `APIError` subclass anywhere in the request path; one handler in app.py turns it into the response.
Messages are written by us (never an exception's text from a library), so nothing internal reaches a client.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error answer: HTTP status, OpenAI `type`, the offending request field (`param`) and a machine `code`."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
                 status: int | None = None, type: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code,
                          **self.extra}}


class InvalidRequest(APIError):
    status, type = 400, "invalid_request_error"


class AuthError(APIError):
    status, type = 401, "authentication_error"


class NotFound(APIError):
    status, type = 404, "invalid_request_error"


class PayloadTooLarge(APIError):
    status, type = 413, "invalid_request_error"


class Overloaded(APIError):
    status, type = 503, "server_overloaded"

    def __init__(self, message: str, retry_after: int = 1, **kwargs: Any):
        super().__init__(message, headers={"Retry-After": str(retry_after)}, **kwargs)


class Internal(APIError):
    status, type = 500, "server_error"


class ContextLengthExceeded(InvalidRequest):
    """Prompt + requested completion over the model's context (llama.cpp-style numbers in the body)."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context: int, param: str = "messages"):
        total = prompt_tokens + max_tokens
        super().__init__(
            f"This model's maximum context length is {context} tokens. However, you requested {total} tokens "
            f"({prompt_tokens} in the messages, {max_tokens} in the completion). Please reduce the length of the "
            "messages or the completion (max_tokens).",
            param=param, code="context_length_exceeded",
            extra={"prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "max_context": context})


def unknown_model(asked: str, served: list[str]) -> NotFound:
    """404 for a model id this server does not serve, naming the id(s) it does."""
    names = ", ".join(f"`{name}`" for name in served)
    return NotFound(f"The model `{asked}` does not exist. This server serves {names} (see GET /v1/models; set the "
                    "name with `onevision serve --served-model-name NAME`).", param="model", code="model_not_found")


__all__ = ["APIError", "AuthError", "ContextLengthExceeded", "Internal", "InvalidRequest", "NotFound", "Overloaded",
           "PayloadTooLarge", "unknown_model"]
