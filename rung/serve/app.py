"""The HTTP app: OpenAI's routes over a ``Server``.

GET /v1/models, POST /v1/chat/completions, POST /v1/completions, POST /v1/responses (and GET / DELETE
/v1/responses/{id} of stored ones), GET /health, GET /metrics.
Every failure is an OpenAI-style JSON error (errors.py); an unexpected exception is a 500 with the
exception's one-line summary, and the server goes on. A route checks the caller and the body; a
generation is a ``Run`` (run.py), which ends in exactly one JSON log line and one set of metric
updates, whether it finished, failed, timed out or its client left.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from rung.govern.policy import Principal
from rung.serve.errors import APIError
from rung.serve.metrics import CONTENT_TYPE
from rung.serve.redaction import redaction_for
from rung.serve.run import Run
from rung.serve import responses_run
from rung.serve.responses_schemas import ResponsesRequest
from rung.serve.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from rung.serve.server import Server
from rung.serve.tracing import Trace


def create_app(server: Server, shutdown_with_app: bool = False) -> FastAPI:
    """``shutdown_with_app``: the app's shutdown (uvicorn's, on SIGTERM) also shuts the server down
    (its engine, tensor-parallel workers, traces), as `rung serve` wants; tests that reuse one
    server across several clients leave it off."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn re-raises SIGTERM once it has shut down, so `rung serve` never returns to its own
        # cleanup: the last spans are flushed here, during the graceful shutdown
        if shutdown_with_app:
            await asyncio.to_thread(server.shutdown)
        elif server.tracing is not None:
            await asyncio.to_thread(server.tracing.flush)

    app = FastAPI(title="rung", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(404)
    async def _not_found(request: Request, e):
        return APIError(404, f"no route {request.method} {request.url.path}", code="not_found").response()

    @app.exception_handler(405)
    async def _method(request: Request, e):
        return JSONResponse(APIError(405, f"method {request.method} is not allowed on {request.url.path}").body(),
                            status_code=405)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        return APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error").response()

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        if request.url.path.startswith("/v1/"):  # labelled by route (/v1/responses/{response_id}), not by id
            handler = getattr(request.scope.get("route"), "path", request.url.path)
            server.metrics.http(handler, request.method, response.status_code)
        return response

    def authorize(request: Request):
        """401 unless the bearer token is the --api-key or a key of the policy file; the caller's
        Principal (its name in the policy and its rules) when there is a policy."""
        key, policy = server.config.api_key, server.policy
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else None
        refused = APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key")
        if policy is not None and policy.authenticates:
            if key is not None and token and _same(token, key):
                return Principal("api-key", policy.default)  # --api-key beside a policy: its default rules
            principal = policy.principal(token)
            if principal is None:
                raise refused
            return principal
        if key is not None and not (token and _same(token, key)):
            raise refused
        return Principal("default", policy.default) if policy is not None else None

    async def body_of(request: Request) -> bytes:
        """The raw body, a 413 past --max-request-bytes (read as it arrives: no CPU work here)."""
        limit = server.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit}",
                           code="request_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        return bytes(raw)

    # ---- routes ---------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if server.load_error is not None:
            return JSONResponse({"status": "failed", "error": str(server.load_error)}, status_code=503)
        if not server.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        if server.engine.error is not None:
            return JSONResponse({"status": "engine failed", "error": str(server.engine.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        stats = await asyncio.to_thread(server.engine_stats)  # waits for the engine's step: not on the loop
        total = None
        if server.llm is not None:
            pool = server.llm.engine.pool
            total = pool.num_blocks * len(pool.groups)
        healthy = server.load_error is None and server.ready and server.engine.error is None
        body = server.metrics.render(stats, server.in_flight, not server.ready, total, healthy)
        return Response(body, media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        card = {"id": server.config.name, "object": "model", "created": server.started, "owned_by": "rung",
                "root": str(server.config.model)}
        if server.llm is not None:
            card["max_model_len"] = server.llm.max_model_len
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        authorize(request)
        server.check_model(name)
        return {"id": name, "object": "model", "created": server.started, "owned_by": "rung"}

    # A request's CPU work (parsing and validating the body, rendering the template, tokenizing,
    # compiling a grammar) runs on the server's prepare threads, inside its admission slot: the
    # event loop only moves bytes, so /health and the streams of others never wait on a big request.

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        trace = Trace()
        with traced_refusal(trace, "chat"):  # a request refused before it runs is a trace too (401, 429, 400)
            principal = authorize(request)
            raw = await body_of(request)
            with server.admit():  # refused before any work is spent on it: a 429 costs next to nothing
                req = await server.off_loop(parse_body, raw, ChatCompletionRequest)
                server.check_model(req.model)
                server.check_ready()
                trace.add("admission", trace.start)
                redaction = await redacted(req, trace)  # before the template: the model sees placeholders
                req = redaction.request if redaction else req
                prepared = await server.off_loop(server.prepare_chat, req, principal)
                run = Run(server, "chat", req, [prepared], log_prompt=prepared.prompt_text, principal=principal,
                          redaction=redaction, trace=trace)
                return await run.respond(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        trace = Trace()
        with traced_refusal(trace, "text_completion"):
            authorize(request)
            raw = await body_of(request)
            with server.admit():
                req = await server.off_loop(parse_body, raw, CompletionRequest)
                server.check_model(req.model)
                server.check_ready()
                trace.add("admission", trace.start)
                redaction = await redacted(req, trace)
                req = redaction.request if redaction else req
                prepared = await server.off_loop(server.prepare_completion, req)
                run = Run(server, "completion", req, prepared, log_prompt=[p.prompt_text for p in prepared],
                          redaction=redaction, trace=trace)
                return await run.respond(request)

    async def redacted(req, trace: Trace):
        started = time.perf_counter()
        redaction = await redaction_for(server, req)
        if redaction is not None:
            trace.add("redaction", started, entities=sum(redaction.counts.values()))
        return redaction

    @contextlib.contextmanager
    def traced_refusal(trace: Trace, operation: str):
        try:
            yield
        except APIError as e:
            if server.tracing is not None and not trace.exported:  # a Run exports its own
                server.tracing.export(trace, operation, server.config.name,
                                      {"http.response.status_code": e.status, "error.type": e.code or str(e.status)},
                                      error=e.message)
            raise

    @app.post("/v1/responses")
    async def responses(request: Request):
        trace = Trace()
        with traced_refusal(trace, "chat"):
            principal = authorize(request)
            raw = await body_of(request)
            with server.admit():
                req = await server.off_loop(parse_body, raw, ResponsesRequest)
                server.check_model(req.model)
                server.check_ready()
                trace.add("admission", trace.start)
                return await responses_run.respond(server, request, req, principal, trace)

    @app.get("/v1/responses/{response_id}")
    async def stored_response(response_id: str, request: Request):
        authorize(request)
        return stored(response_id).response

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, request: Request):
        authorize(request)
        stored(response_id)
        server.responses.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    def stored(response_id: str):
        entry = server.responses.get(response_id)
        if entry is None:
            raise APIError(404, f"Response with id '{response_id[:200]}' not found (unknown, expired, or not stored)",
                           "response_id", "not_found")
        return entry

    return app


def _same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())
