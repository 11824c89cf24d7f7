"""OpenAI-shaped API errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

from __future__ import annotations


class ApiError(Exception):
    """Raised anywhere in a request; the app turns it into OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def not_found(what: str, ident: str, code: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"No such {what}: '{ident}'", param=param, code=code)


def parse_limit(value, default: int, maximum: int) -> int:
    """`limit` query parameter: an integer 1..maximum (400 naming `limit` otherwise)."""
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise bad_request(f"limit must be an integer, got {value!r}", "limit") from None
    if not 1 <= n <= maximum:
        raise bad_request(f"limit must be between 1 and {maximum}, got {n}", "limit")
    return n
