"""OpenAI-shaped errors: one exception, one envelope, one set of handlers.

Every error under /v1 leaves as `{"error": {"message", "type", "param", "code"}}`
with the right status. FastAPI's 422 `{"detail": ...}` and bare 500s never reach
a client: the handlers here convert them all.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any, NamedTuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..contract.render_request import LOADING_RETRY_AFTER, GenerationOutcome, OutcomeStatus

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
        outcome: OutcomeStatus | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _TYPE_BY_STATUS.get(status, "server_error")
        self.headers = headers or {}
        # The render outcome this error answers (outcome_error), for what is not HTTP:
        # an image job's retry policy (jobs/retry.py). Never part of the answer.
        self.outcome = outcome
        # The seconds of the Retry-After header, as a number.
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# Errors quote at most this much of what the client sent.
EXCERPT_CHARS = 64


def excerpt(value: str) -> str:
    """`value`, or its start: an error message never echoes a megabyte back."""
    return value if len(value) <= EXCERPT_CHARS else value[:EXCERPT_CHARS] + "…"


def invalid_value(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def missing_parameter(param: str | None) -> APIError:
    message = f"Missing required parameter: '{param}'."
    return APIError(400, message, param=param, code="missing_required_parameter")


def unavailable(
    message: str,
    retry_after: float,
    code: str,
    status: int = 503,
    outcome: OutcomeStatus | None = None,
) -> APIError:
    # x-should-retry lets the openai client retry on its own, honouring Retry-After.
    seconds = max(1, round(retry_after))
    return APIError(
        status,
        message,
        code=code,
        headers={"Retry-After": str(seconds), "x-should-retry": "true"},
        outcome=outcome,
        retry_after=seconds,
    )


def client_closed() -> APIError:
    # Nobody reads this answer; 499 keeps it out of the error log.
    return APIError(499, "The client closed the request.", code="cancelled")


# How each way a generation can end without images reaches the client: HTTP
# status, error code, and whether the openai client should retry on its own
# (after Retry-After) or give up.
class _OutcomeError(NamedTuple):
    status: int
    code: str
    # True: Retry-After and x-should-retry: true; False: x-should-retry: false;
    # None: neither (a client error, or nobody left to read it).
    should_retry: bool | None
    param: str | None = None


_OUTCOME_ERRORS: dict[OutcomeStatus, _OutcomeError] = {
    OutcomeStatus.QUEUE_FULL: _OutcomeError(429, "queue_full", True),
    OutcomeStatus.LOADING: _OutcomeError(503, "loading", True),
    OutcomeStatus.TIMEOUT: _OutcomeError(504, "timeout", False),
    OutcomeStatus.OUT_OF_MEMORY: _OutcomeError(503, "out_of_memory", False),
    OutcomeStatus.WORKER_RESTARTED: _OutcomeError(503, "worker_restarted", True),
    OutcomeStatus.INVALID_LORA: _OutcomeError(400, "invalid_lora", None, param="loras"),
    OutcomeStatus.INVALID_MODEL: _OutcomeError(400, "invalid_model", None, param="model"),
    OutcomeStatus.INVALID_UPSCALER: _OutcomeError(400, "invalid_upscaler", None, param="upscaler"),
    OutcomeStatus.INVALID_CONTROLNET: _OutcomeError(
        400, "invalid_controlnet", None, param="controlnets"
    ),
    OutcomeStatus.CONTENT_POLICY_VIOLATION: _OutcomeError(400, "content_policy_violation", None),
    # The message names the field (prompt or negative_prompt).
    OutcomeStatus.INVALID_EMBEDDING: _OutcomeError(400, "invalid_embedding", None),
    OutcomeStatus.CANCELLED: _OutcomeError(499, "cancelled", None),
    OutcomeStatus.ERROR: _OutcomeError(500, "generation_failed", False),
}


def outcome_error(outcome: GenerationOutcome) -> APIError:
    """The OpenAI error for a generation that ended without images."""
    error = _OUTCOME_ERRORS[outcome.status]
    message = outcome.message or outcome.status.value
    if error.should_retry:
        retry_after = outcome.retry_after or LOADING_RETRY_AFTER
        return unavailable(message, retry_after, error.code, error.status, outcome.status)
    headers = {} if error.should_retry is None else {"x-should-retry": "false"}
    return APIError(
        error.status,
        message,
        param=error.param,
        code=error.code,
        headers=headers,
        outcome=outcome.status,
    )


def _param_from_location(loc: Sequence[Any]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "form")]
    # Pydantic puts the failing validator's tag after the field name
    # (e.g. "function-after[...]"); the client only needs the field.
    parts = [p for p in parts if "[" not in p]
    # A list item by its index, as the API names it: controlnets[0].scale.
    path = ""
    for part in parts:
        path += f"[{part}]" if part.isdigit() and path else f".{part}" if path else part
    return path or None


def validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = first.get("loc", ())
    param = _param_from_location(loc)
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "The request body is not valid JSON.", code="invalid_json")
    if kind == "missing":
        # No body at all: the only JSON body is a generation's, and what it
        # cannot do without is its prompt.
        return missing_parameter(param or "prompt")
    if kind == "model_attributes_type" or (param is None and kind.endswith("_type")):
        return APIError(400, "The request body must be a JSON object.", code="invalid_request_body")
    detail = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    message = f"Invalid value for '{param}': {detail}." if param else f"{detail}."
    return APIError(400, message.replace("..", "."), param=param, code="invalid_value")


def routing_error(status: int, method: str, path: str, detail: str | None = None) -> APIError:
    """The error of a request no route takes: an unknown path (404), a method a path does not
    have (405), or another status the router or BentoML answered. The /v1 app, its catch-all
    route and the middleware around BentoML all answer with this one."""
    if status == 404:
        return APIError(404, f"Unknown path: {method} {excerpt(path)}.", code="not_found")
    if status == 405:
        message = f"Method {method} is not allowed on {excerpt(path)}."
        return APIError(405, message, code="method_not_allowed")
    phrase = HTTPStatus(status).phrase
    return APIError(status, detail or phrase, code=phrase.lower().replace(" ", "_"))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = routing_error(exc.status_code, request.method, request.url.path, str(exc.detail))
        error.headers.update(exc.headers or {})
        return error.response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Logged with its traceback here; the client gets a message, never the trace.
        logger.exception("unhandled error")
        return APIError(
            500, "The server failed to process the request.", code="internal_error"
        ).response()
