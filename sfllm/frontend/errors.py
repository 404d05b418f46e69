"""HTTP errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Client mistakes are 4xx with the offending parameter named; an engine that cannot take
the request is 503 with Retry-After; only a bug in sfllm is a 500.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sfllm.frontend.engine_client import EngineRequestError, EngineUnavailableError
from sfllm.frontend.http_responses import ClientDisconnectedError
from sfllm.frontend.chat_template import ChatTemplateError
from sfllm.sampling_params import InvalidSamplingParams

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
# nginx's status for a client that left before its answer.
CLIENT_CLOSED_REQUEST = 499


class APIError(Exception):
    def __init__(self, status_code: int, message: str, *, error_type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        # ASCII JSON: a message quoting the client's text stays valid even if that text holds an unpaired surrogate.
        return Response(json.dumps(self.body()), status_code=self.status_code, headers=self.headers,
                        media_type="application/json")


class InvalidRequestError(APIError):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(400, message, param=param, code=code)


class ContextLengthExceededError(APIError):
    def __init__(self, num_prompt_tokens: int, max_tokens: int | None, max_context_length: int, param: str,
                 field: str = "max_tokens") -> None:
        if max_tokens is None:
            message = (f"This model's maximum context length is {max_context_length} tokens, but the prompt has "
                       f"{num_prompt_tokens} tokens, which leaves no room for the completion. "
                       "Please reduce the length of the prompt.")
        else:
            message = (f"This model's maximum context length is {max_context_length} tokens. However, you requested "
                       f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} for "
                       f"the completion). Please reduce the length of the prompt or {field}.")
        super().__init__(400, message, param=param, code="context_length_exceeded")


class ModelNotFoundError(APIError):
    def __init__(self, model: str, served_model_name: str) -> None:
        super().__init__(404, f"The model `{_quoted(model)}` does not exist; this server serves "
                              f"`{served_model_name}`.", param="model", code="model_not_found")


# The most of a client's value an error message quotes: an answer must not grow with the request.
MAX_QUOTED_CHARS = 64


def _quoted(value: str) -> str:
    if len(value) <= MAX_QUOTED_CHARS:
        return value
    return f"{value[:MAX_QUOTED_CHARS]}... ({len(value)} characters)"


class AuthenticationError(APIError):
    def __init__(self) -> None:
        super().__init__(401, "Incorrect or missing API key; send it as 'Authorization: Bearer <key>'.",
                         error_type="authentication_error", code="invalid_api_key",
                         headers={"WWW-Authenticate": "Bearer"})


class ServiceUnavailableError(APIError):
    def __init__(self, message: str, code: str = "engine_unavailable") -> None:
        super().__init__(503, message, error_type="service_unavailable_error", code=code,
                         headers={"Retry-After": str(RETRY_AFTER_S)})


class ServerDrainingError(ServiceUnavailableError):
    def __init__(self) -> None:
        super().__init__("This server is shutting down and takes no new requests; retry on another replica.",
                         code="server_draining")


class ServerShutdownError(ServiceUnavailableError):
    def __init__(self, why: str) -> None:
        """`why`: what ended the drain, e.g. "its drain timeout passed"."""
        super().__init__(f"This server shut down before the request finished ({why}); retry it on another replica.",
                         code="server_shutdown")


class RequestTooLargeError(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than this server's limit of {limit} bytes "
                              "(max_request_body_bytes).", code="request_too_large")


class RequestTimeoutError(APIError):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(504, f"The request ran longer than this server's limit of {timeout_s:g} s "
                              "(request_timeout_s) and was stopped; ask for fewer tokens or retry later.",
                         error_type="timeout_error", code="request_timeout")


def api_error_from(error: Exception) -> APIError:
    """The HTTP error for an exception raised while serving a request."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, InvalidSamplingParams):
        return InvalidRequestError(str(error), param=error.param)
    if isinstance(error, ChatTemplateError):
        return InvalidRequestError(str(error), param=error.param)
    if isinstance(error, EngineUnavailableError):
        return ServiceUnavailableError(str(error))
    if isinstance(error, EngineRequestError):
        if error.status_code == 503:
            return ServiceUnavailableError(str(error), code="engine_overloaded")
        if 400 <= error.status_code < 500:
            return APIError(error.status_code, str(error), param=error.param)
        return APIError(error.status_code, str(error), error_type="server_error")
    logger.error("unexpected error while serving a request", exc_info=error)
    return APIError(500, f"internal server error: {type(error).__name__}", error_type="server_error")


def _is_union_member_tag(part: str) -> bool:
    """pydantic names the union member that failed in the location: `str`, `list[int]`."""
    return part in ("str", "int", "float", "bool") or not part.isidentifier()


def _validation_param(location: tuple[Any, ...]) -> str | None:
    """`("body", "messages", 0, "role")` -> `messages[0].role`."""
    name = ""
    for part in location[1:] if location[:1] == ("body",) else location:
        if isinstance(part, int):
            name += f"[{part}]"
        elif _is_union_member_tag(part):
            continue
        else:
            name += f".{part}" if name else part
    return name or None


def _validation_error(error: RequestValidationError) -> APIError:
    errors = error.errors()
    # Of the errors of a union's members, the deepest is the most specific.
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    if first.get("type") == "json_invalid":
        return InvalidRequestError(f"The request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    param = _validation_param(tuple(first.get("loc", ())))
    if param is None:
        return InvalidRequestError("The request body must be a JSON object (sent as Content-Type: "
                                   f"application/json): {first.get('msg', '')}")
    if first.get("type") == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param)
    # A value that fits no member of a union fails once per member: say what each expected.
    messages = [e.get("msg", "invalid value").removeprefix("Value error, ") for e in errors
                if _validation_param(tuple(e.get("loc", ()))) == param]
    return InvalidRequestError(f"Invalid value for '{param}': {', or '.join(dict.fromkeys(messages))}", param=param)


class UnexpectedErrorMiddleware:
    """A bug's exception answered with api_error_from's 500 while no answer has started. Starlette's handler for
    Exception answers too, then re-raises, and uvicorn drops the connection without saying so: the client's next
    request on that keep-alive connection would fail. Added first, so that it sits inside the other middlewares."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_noting_start)
        except Exception as error:
            if started:  # a stream cut by a bug: closing the connection is all that is left
                raise
            await api_error_from(error).response()(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    async def on_validation_error(_: Request, error: RequestValidationError) -> Response:
        return _validation_error(error).response()

    async def on_http_exception(_: Request, error: StarletteHTTPException) -> Response:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return APIError(error.status_code, str(error.detail), error_type=kind, headers=error.headers).response()

    async def on_error(_: Request, error: Exception) -> Response:
        return api_error_from(error).response()

    async def on_client_disconnected(_: Request, __: ClientDisconnectedError) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it; it marks the access log

    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    app.add_exception_handler(ClientDisconnectedError, on_client_disconnected)
    # Exception last: a bug in a middleware outside UnexpectedErrorMiddleware still answers in OpenAI's shape
    # (Starlette then re-raises it to be logged).
    for error_class in (APIError, InvalidSamplingParams, ChatTemplateError, EngineUnavailableError,
                        EngineRequestError, Exception):
        app.add_exception_handler(error_class, on_error)
