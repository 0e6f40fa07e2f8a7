"""OpenAI-style errors: every failure leaves the server as
``{"error": {"message", "type", "param", "code"}}`` with the status a client library maps to its
exception (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 429 RateLimitError, ...)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

# status → OpenAI's error type for it
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
         503: "service_unavailable"}


MAX_MESSAGE = 1000  # characters of an error message: some quote the request, which may be megabytes


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        message = " ".join(message.splitlines())  # one line, whatever a library's exception held
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + "..."
        if param is not None and len(param) > MAX_MESSAGE:
            param = param[:MAX_MESSAGE] + "..."
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def pydantic_errors(error, data) -> APIError:
    """A pydantic ValidationError as one 400 naming the offending field (``messages.0.role``).

    ``loc`` mixes the keys of ``data`` (the parsed body) with the names of union branches
    (``str``, ``list[ContentPart]``, ``NamedToolChoice``); the field is the part of ``loc`` that
    walks through ``data``. Of a union's errors, the one that walks deepest names the field best
    (``messages.0.content.0.text``, not ``messages.0.content``)."""
    errors = error.errors(include_url=False)
    paths = [_path(e.get("loc", ()), data, e.get("type") == "missing") for e in errors]
    best = max(range(len(errors)), key=lambda i: len(paths[i]))  # the first of the deepest
    first, param = errors[best], ".".join(paths[best]) or None
    kind = first.get("type")
    if kind == "extra_forbidden":
        message = f"unknown field {param!r}" if param else "unknown field"
    elif kind == "missing":
        message = f"missing required field {param!r}"
    else:
        why = str(first.get("msg")).removeprefix("Value error, ")  # a validator's ValueError, as it said it
        message = f"{param}: {why}" if param else why
    return bad_request(message, param)


def _path(loc, data, missing: bool) -> list[str]:
    """The keys of ``loc`` that index into ``data``; a missing field's own name last."""
    path, node = [], data
    for i, key in enumerate(loc):
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            node = node[key]
        elif not (missing and i == len(loc) - 1):
            continue  # a union branch's name: not a field
        path.append(str(key))
    return path
