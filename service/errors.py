"""One error hierarchy; the edge (service/edge.py) converts it once to `{"error": {"message", "type", "param",
"code"}}`."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.type

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(ServiceError):
    status = 422
    type = "invalid_request_error"


class PayloadTooLarge(ServiceError):
    status = 413
    type = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status = 415
    type = "unsupported_media_type"


class Unauthorized(ServiceError):
    status = 401
    type = "authentication_error"


class Overloaded(ServiceError):
    status = 429
    type = "overloaded"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(ServiceError):
    status = 504
    type = "timeout"


class BadRequest(ServiceError):
    status = 400
    type = "invalid_request_error"


class Busy(ServiceError):
    """Too many requests in flight (RMSERVE_MAX_IN_FLIGHT): 503 with Retry-After."""

    status = 503
    type = "busy"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = 1


class TooManyPipelined(ServiceError):
    """More requests pipelined on one connection than RMSERVE_MAX_PIPELINED: 429, the connection closes."""

    status = 429
    type = "too_many_pipelined"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.retry_after = 1


class NotReady(ServiceError):
    status = 503
    type = "not_ready"


class InferenceFailed(ServiceError):
    status = 500
    type = "inference_error"


class _Validation(ServiceError):
    type = "invalid_request_error"

    def __init__(self, message: str, *, status: int, param: str | None, code: str) -> None:
        super().__init__(message, param=param, code=code)
        self.status = status


# pydantic's names for union branches, dropped from error locations ('str', 'list[Message]', ...).
_BRANCH_NAMES = (
    "str",
    "list[Message]",
    "list[TextPart]",
    "list[str]",
    "list[list[str]]",
    "RerankDocument",
    "RerankRequest",
    "TEIRerankRequest",
    "ScoreRequest",
    "VLLMScoreRequest",
)


def field_path(loc: Any) -> str | None:
    """pydantic's error location as the field's name in the request, `items[0].prompt[1].content` (the
    style of every other error's `param`), without the body and union-branch names; None for the body."""
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p != "body" and not (p in _BRANCH_NAMES or str(p).startswith("function-")):
            out += f".{p}" if out else str(p)
    return out or None


def validation_error(errors: list[dict[str, Any]]) -> ServiceError:
    """pydantic's validation errors -> one error naming the deepest bad field (400 for invalid JSON).
    A check over several fields (a model validator) names its field through `ctx["param"]`."""
    errors = sorted(errors, key=lambda e: -len(e.get("loc", ())))  # with unions the deepest is informative
    first: dict[str, Any] = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    ctx: Any = first.get("ctx") or {}
    param = field_path(first.get("loc", ()))
    if isinstance(ctx.get("param"), str):
        param = f"{param}.{ctx['param']}" if param else ctx["param"]
    kind = str(first.get("type", "invalid"))
    if kind == "json_invalid":
        msg = f"the request body is not valid JSON: {ctx.get('error', first.get('msg'))}"
        return _Validation(msg, status=400, param="body", code="json_invalid")
    if param is None and kind == "missing":
        msg = "the request body is empty: send a JSON object (Content-Type: application/json)"
        return _Validation(msg, status=422, param="body", code="body_missing")
    if param is None and kind in ("model_attributes_type", "dict_type", "model_type"):
        msg = "the request body must be a JSON object (send Content-Type: application/json)"
        return _Validation(msg, status=422, param="body", code="body_not_object")
    if kind == "extra_forbidden":  # a field this route does not honour: refused, never accepted and dropped
        msg = f"{param} is not supported on this route; leave it out (see the route's fields in /docs)"
        if len(errors) > 1:
            msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return _Validation(msg, status=422, param=param or "body", code="not_supported")
    text = str(first.get("msg"))
    text = text.removeprefix("Value error, ")
    msg = f"{param + ': ' if param else ''}{text}"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return _Validation(msg, status=422, param=param or "body", code=kind)


class HeadersTooLarge(ServiceError):
    status = 431
    type = "headers_too_large"


class RequestTimeout(ServiceError):
    status = 408
    type = "request_timeout"
