"""The HTTP app: OpenAI's routes over a ``Server``.

GET /v1/models, POST /v1/chat/completions, POST /v1/completions, POST /v1/responses (and GET / DELETE
/v1/responses/{id} of stored ones), POST /tokenize, POST /detokenize, GET /health, GET /metrics. A route finds the request's model with ``models.get(name)`` (models.py):
each model has its own engine, and a server may serve several.
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
from rung.serve import responses_run
from rung.serve.models import Models
from rung.serve.redaction import redaction_for
from rung.serve.responses_schemas import ResponsesRequest
from rung.serve.run import Run
from rung.serve.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from rung.serve.server import Server
from rung.serve.tokenize import DetokenizeRequest, TokenizeRequest, detokenize, tokenize
from rung.serve.tracing import Trace


class CountResponses:
    """Every API response by status, labelled by model and by route (/v1/responses/{response_id},
    not by id), counted when its status goes out. An unexpected exception passes through here on
    its way to the outermost handler, which makes it the 500 counted here (RungHigh5xxRate reads
    these). Plain ASGI: starlette's @app.middleware("http") passes every chunk of a streamed body
    through a memory stream and a task switch of its own, per token of every stream."""

    def __init__(self, app, models: Models):
        self.app, self.models = app, models

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith("/v1/") or path in ("/tokenize", "/detokenize")):
            return await self.app(scope, receive, send)
        started = False

        async def counted_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                self.count(scope, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        except Exception:
            if not started:
                self.count(scope, 500)
            raise

    def count(self, scope, status: int) -> None:
        name = scope.get("rung.model")  # set by the route once it found the model (one scope)
        metrics = self.models.metrics.labelled(name) if name else self.models.metrics
        metrics.http(getattr(scope.get("route"), "path", scope["path"]), scope["method"], status)


def create_app(served: Server | Models, shutdown_with_app: bool = False) -> FastAPI:
    """The app over one ``Server`` (a registry of one) or a ``Models`` registry.
    ``shutdown_with_app``: the app's shutdown (uvicorn's, on SIGTERM) also shuts the models down
    (engines, tensor-parallel workers, traces), as `rung serve` wants; tests that reuse one server
    across several clients leave it off (the last spans are still flushed)."""
    models = served if isinstance(served, Models) else Models.of(served)
    config = models.config  # the server-wide settings: api key, policy, limits

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn re-raises SIGTERM once it has shut down, so `rung serve` never returns to its own
        # cleanup: the models are shut down (and their last spans flushed) here
        if shutdown_with_app:
            await asyncio.to_thread(models.shutdown)
        else:
            for server in models.loaded():
                if server.tracing is not None:
                    await asyncio.to_thread(server.tracing.flush)

    app = FastAPI(title="rung", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.models = models

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

    app.add_middleware(CountResponses, models=models)

    def authorize(request: Request):
        """401 unless the bearer token is the --api-key or a key of the policy file; the caller's
        Principal (its name in the policy and its rules) when there is a policy."""
        key, policy = config.api_key, config.policy
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
        limit = config.max_request_bytes
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

    @contextlib.asynccontextmanager
    async def model_for(request: Request, name: str):
        """``models.get(name)``, and the model's name on the request for the http metric."""
        async with models.get(name) as server:
            request.scope["rung.model"] = server.config.name
            yield server

    @app.get("/health")
    async def health():
        status, error = models.health()
        if status != "ok":
            return JSONResponse({"status": status, **({"error": error} if error else {})}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        for slot in list(models.slots.values()):
            server = slot.server
            loaded = server is not None and server.ready
            stats = await asyncio.to_thread(server.engine_stats) if loaded else {}  # waits for the engine's step
            total = None
            if loaded and server.llm is not None:
                pool = server.llm.engine.pool
                total = pool.num_blocks * len(pool.groups)
            in_flight = server.in_flight if server is not None else 0
            healthy = loaded and server.load_error is None and (server.engine is None or server.engine.error is None)
            models.metrics.labelled(slot.name).update(stats, in_flight, slot.starting and not loaded, total, healthy)
        return Response(models.metrics.exposition(), media_type=CONTENT_TYPE)

    def card(slot) -> dict:
        card = {"id": slot.name, "object": "model", "created": models.started, "owned_by": "rung",
                "root": str(slot.config.model)}
        server = slot.server
        if server is not None and server.llm is not None:
            card["max_model_len"] = server.llm.max_model_len
        return card

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [card(slot) for slot in models.slots.values()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        authorize(request)
        return card(models.slot(name))

    # A request's CPU work (parsing and validating the body, rendering the template, tokenizing,
    # compiling a grammar) runs on the server's prepare threads, inside its admission slot: the
    # event loop only moves bytes, so /health and the streams of others never wait on a big request.

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        trace = Trace()
        with traced_refusal(trace, "chat", request):  # a request refused before it runs is a trace too
            principal = authorize(request)
            raw = await body_of(request)
            with models.admit():  # refused before any work is spent on it: a 429 costs next to nothing
                req = await models.off_loop(parse_body, raw, ChatCompletionRequest)
                async with model_for(request, req.model) as server:
                    trace.add("admission", trace.start)
                    redaction = await redacted(server, req, trace)  # before the template: the model sees placeholders
                    req = redaction.request if redaction else req
                    prepared = await server.off_loop(server.prepare_chat, req, principal)
                    run = Run(server, "chat", req, [prepared], log_prompt=prepared.prompt_text, principal=principal,
                              redaction=redaction, trace=trace)
                    return await run.respond(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        trace = Trace()
        with traced_refusal(trace, "text_completion", request):
            authorize(request)
            raw = await body_of(request)
            with models.admit():
                req = await models.off_loop(parse_body, raw, CompletionRequest)
                async with model_for(request, req.model) as server:
                    trace.add("admission", trace.start)
                    redaction = await redacted(server, req, trace)
                    req = redaction.request if redaction else req
                    prepared = await server.off_loop(server.prepare_completion, req)
                    run = Run(server, "completion", req, prepared, log_prompt=[p.prompt_text for p in prepared],
                              redaction=redaction, trace=trace)
                    return await run.respond(request)

    @app.post("/v1/responses")
    async def responses(request: Request):
        trace = Trace()
        with traced_refusal(trace, "chat", request):
            principal = authorize(request)
            raw = await body_of(request)
            with models.admit():
                req = await models.off_loop(parse_body, raw, ResponsesRequest)
                async with model_for(request, req.model) as server:
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
        models.responses.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    def stored(response_id: str):
        entry = models.responses.get(response_id)
        if entry is None:
            raise APIError(404, f"Response with id '{response_id[:200]}' not found (unknown, expired, or not stored)",
                           "response_id", "not_found")
        return entry

    async def redacted(server: Server, req, trace: Trace):
        started = time.perf_counter()
        redaction = await redaction_for(server, req)
        if redaction is not None:
            trace.add("redaction", started, entities=sum(redaction.counts.values()))
        return redaction

    @contextlib.contextmanager
    def traced_refusal(trace: Trace, operation: str, request: Request):
        """A request refused before its Run (401, 404, 429, 400, 503) exported as a trace of its own,
        through its model's tracer (or any loaded model's, when the model is not known)."""
        try:
            yield
        except APIError as e:
            tracing = models.tracing(request.scope.get("rung.model"))
            if tracing is not None and not trace.exported:  # a Run exports its own
                tracing.export(trace, operation, request.scope.get("rung.model") or "unknown",
                               {"http.response.status_code": e.status, "error.type": e.code or str(e.status)},
                               error=e.message)
            raise

    def named(model: str | None) -> str:
        """/tokenize's and /detokenize's model: optional where one model is served, as in vLLM."""
        if model is not None:
            return model
        if len(models.slots) == 1:
            return next(iter(models.slots))
        served = ", ".join(f"'{n}'" for n in models.slots)
        raise APIError(400, f"model is required: this server serves {served}", "model")

    @app.post("/tokenize")
    async def tokenize_route(request: Request):
        principal = authorize(request)
        raw = await body_of(request)
        with models.admit():
            req = await models.off_loop(parse_body, raw, TokenizeRequest)
            async with model_for(request, named(req.model)) as server:
                return await server.off_loop(tokenize, server, req, principal)

    @app.post("/detokenize")
    async def detokenize_route(request: Request):
        authorize(request)
        raw = await body_of(request)
        with models.admit():
            req = await models.off_loop(parse_body, raw, DetokenizeRequest)
            async with model_for(request, named(req.model)) as server:
                return await server.off_loop(detokenize, server, req)

    return app


def _same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())
