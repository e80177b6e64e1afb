"""Every error the API returns is ``{"error": code, "message": ..., "details"?: ...}`` with its status.

- :class:`hivemind.errors.HivemindError`: its own code and status (the one error hierarchy of the product);
- request validation (pydantic): 400 ``invalid_input`` naming the field, never echoing the value sent
  (it may be a secret or a wrap) and never pydantic internals;
- unknown route: 404 ``not_found``; wrong method: 405 ``method_not_allowed``;
- anything else: 500 ``internal_error`` with only a request id; the traceback goes to the log.

Bodies are checked before any route sees them (:class:`RequestGate`): larger than the configured
maximum is 413 ``payload_too_large``; JSON that does not parse, repeats a key, holds ``NaN`` or an unpaired
UTF-16 surrogate is 400 ``invalid_json``. So no handler can be reached with input that would later fail
to store or to canonicalize.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from hivemind.errors import HivemindError, InvalidInput, PayloadTooLarge

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_MAX_JSON_DEPTH = 64


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: str = Field(description="stable machine-readable code, e.g. room_deleted")
    message: str = Field(description="what went wrong and, where possible, what to do")
    details: dict[str, Any] | None = Field(default=None, description="structured context, when useful")


def error_response(error: HivemindError) -> JSONResponse:
    """The JSON answer for ``error`` (the request gate adds the request id header)."""
    return JSONResponse(status_code=error.status, content=error.to_dict())


def _describe_validation(exc: RequestValidationError) -> InvalidInput:
    errors = exc.errors()
    if not errors:
        return InvalidInput("the request is invalid")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return InvalidInput("the body is not valid JSON", code="invalid_json")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    where = ".".join(location) or "body"
    # ``msg`` describes the rule that failed; ``input`` (the value sent) is deliberately left out.
    message = str(first.get("msg", "invalid value"))
    if len(message) > 300:
        message = message[:300] + "..."
    suffix = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return InvalidInput(f"{where}: {message}{suffix}", details={"field": where})


def install_error_handlers(app: FastAPI) -> None:
    async def on_hivemind_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HivemindError)
        return error_response(exc)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(_describe_validation(exc))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            error = HivemindError(f"no route {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            error = HivemindError(
                f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed"
            )
        else:
            error = HivemindError(str(exc.detail), code="http_error")
        return JSONResponse(status_code=exc.status_code, content=error.to_dict())

    app.add_exception_handler(HivemindError, on_hivemind_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)


# --- the body gate ---------------------------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise InvalidInput(f"JSON holds {name}, which is not a number", code="invalid_json")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidInput("JSON object repeats a key", code="invalid_json")
        result[key] = value
    return result


def _check_text(value: Any, depth: int = 0) -> None:
    if depth > _MAX_JSON_DEPTH:
        raise InvalidInput(f"JSON nests deeper than {_MAX_JSON_DEPTH} levels", code="invalid_json")
    if isinstance(value, str):
        _check_string(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_string(key)
            _check_text(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_text(item, depth + 1)


def _check_string(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(
            "JSON text holds an unpaired UTF-16 surrogate (\\ud800-\\udfff); it cannot be stored",
            code="invalid_json",
        ) from None


def check_json_body(body: bytes) -> None:
    """Refuse a body that is not strict JSON (see module docstring)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("the body is not UTF-8", code="invalid_json") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_refuse_constant)
    except RecursionError:
        raise InvalidInput("JSON nests too deeply", code="invalid_json") from None
    except ValueError as exc:
        raise InvalidInput(
            f"the body is not valid JSON: {exc.args[0] if exc.args else exc}", code="invalid_json"
        ) from None
    _check_text(value)


def _is_json(content_type: str | None) -> bool:
    if content_type is None:
        return True  # FastAPI reads a body without a content type as JSON
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class RequestGate:
    """Outermost ASGI middleware: request id, size cap and strict JSON, and the last-resort 500.

    - every response carries ``x-request-id`` (the Lambda request id under Mangum) and
      ``cache-control: no-store``;
    - bodies are small by design (bulk data goes to S3 through presigned URLs), so one is buffered
      here and checked before any route runs; Lambda hands the whole body over at once anyway;
    - an exception no handler turned into an answer becomes 500 ``internal_error`` with the request id
      and nothing else; the traceback goes to the log. (Starlette's own last-resort handler re-raises,
      which under Mangum would fail the Lambda invocation instead of answering.)
    """

    def __init__(self, app: ASGIApp, *, services: Callable[[], Any]) -> None:
        self.app = app
        self._services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = scope.get("aws.context")
        request_id = str(getattr(context, "aws_request_id", None) or uuid.uuid4().hex)
        scope["hivemind.request_id"] = request_id
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.lower() not in (b"x-request-id", b"cache-control")
                ]
                headers += [(b"x-request-id", request_id.encode()), (b"cache-control", b"no-store")]
                message = {**message, "headers": headers}
            await send(message)

        try:
            services = self._services()
        except Exception:
            # Bad settings or storage coordinates: an operator problem, not the caller's (no details).
            logging.getLogger("hivemind_functions.api").exception("the API services cannot be built")
            error = HivemindError(f"the service is misconfigured; quote request id {request_id}")
            await error_response(error)(scope, receive, send_with_headers)
            return
        try:
            services.logger.clear_state()
            services.logger.append_keys(request_id=request_id)
            body = await self._read_body(scope, receive, services.settings.max_body_bytes)
            if body is None:
                return
            delivered = False

            async def replay() -> Message:
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_with_headers)
        except HivemindError as exc:
            if not started:
                await error_response(exc)(scope, receive, send_with_headers)
        except Exception:
            services.logger.exception("unhandled error (request %s)", request_id)
            if not started:
                error = HivemindError(f"internal error; quote request id {request_id} when reporting it")
                await error_response(error)(scope, receive, send_with_headers)

    @staticmethod
    async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
        """The whole body, checked; ``None`` if the client went away. Raises the refusal otherwise."""
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise _too_large(limit)
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                raise _too_large(limit)
        if body and _is_json(headers.get("content-type")):
            check_json_body(bytes(body))
        return bytes(body)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the request body is larger than {limit} bytes; upload data through the presigned URLs instead"
    )
