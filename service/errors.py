"""One error hierarchy; the app converts it once to `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations


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


class NotReady(ServiceError):
    status = 503
    type = "not_ready"


class InferenceFailed(ServiceError):
    status = 500
    type = "inference_error"
