"""OpenAI-style errors: every failure leaves the server as
``{"error": {"message", "type", "param", "code"}}`` with the status a client library maps to its
exception (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 429 RateLimitError, ...)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

# status → OpenAI's error type for it
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
         503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def pydantic_errors(error) -> APIError:
    """A pydantic ValidationError as one 400 naming the first offending field (``messages.0.role``)."""
    first = error.errors(include_url=False)[0]
    loc = [str(p) for p in first.get("loc", ()) if not str(p).startswith(("function-", "tagged-union["))]
    # unions report each branch (`str`, `list[...]`): keep the path, drop the branch names
    loc = [p for p in loc if not (p.startswith(("list[", "dict[", "str", "int", "float", "literal[", "json-or-python"))
                                   or p in ("bool", "none"))]
    param = ".".join(loc) or None
    kind = first.get("type")
    if kind == "extra_forbidden":
        message = f"unknown field {param!r}" if param else "unknown field"
    elif kind == "missing":
        message = f"missing required field {param!r}"
    else:
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return bad_request(message, param)
