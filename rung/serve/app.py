"""The HTTP app: OpenAI's routes over a ``Server``.

GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health, GET /metrics.
Every failure is an OpenAI-style JSON error (errors.py); an unexpected exception is a 500 with the
exception's one-line summary, and the server goes on. A request ends in exactly one JSON log
line and one set of metric updates, whether it finished, failed, timed out or its client left.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from rung.govern.policy import Principal
from rung.serve import logs
from rung.serve.errors import APIError
from rung.serve.grounding import add_rung, choice_fields, reply_fields
from rung.serve.governance import VERIFIER_REFUSAL, ToolGate, sources_of
from rung.serve.metrics import CONTENT_TYPE
from rung.serve.reasoning import Event
from rung.serve.responses import (DONE, Choice, TokenText, call_json, chat_logprobs, completion_logprobs, sse,
                                  usage)
from rung.serve.redaction import RequestRedaction, redaction_for
from rung.serve.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from rung.serve.server import Prepared, Server, wait_disconnect


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="rung", docs_url=None, redoc_url=None, openapi_url=None)
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
        if request.url.path.startswith("/v1/"):
            server.metrics.http(request.url.path, request.method, response.status_code)
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
        body = server.metrics.render(stats, server.in_flight, not server.ready, total)
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
        principal = authorize(request)
        raw = await body_of(request)
        with server.admit():  # refused before any work is spent on it: a 429 costs next to nothing
            req = await server.off_loop(parse_body, raw, ChatCompletionRequest)
            server.check_model(req.model)
            server.check_ready()
            redaction = await redaction_for(server, req)  # before the template: the model sees placeholders
            req = redaction.request if redaction else req
            prepared = await server.off_loop(server.prepare_chat, req, principal)
            run = Run(server, "chat", req, [prepared], log_prompt=prepared.prompt_text, principal=principal,
                      redaction=redaction)
            return await run.respond(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        raw = await body_of(request)
        with server.admit():
            req = await server.off_loop(parse_body, raw, CompletionRequest)
            server.check_model(req.model)
            server.check_ready()
            redaction = await redaction_for(server, req)
            req = redaction.request if redaction else req
            prepared = await server.off_loop(server.prepare_completion, req)
            run = Run(server, "completion", req, prepared, log_prompt=[p.prompt_text for p in prepared],
                      redaction=redaction)
            return await run.respond(request)

    return app


def _same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


class Run:
    """One HTTP request's generation: its engine requests (one per prompt), its choices, its log
    line and metrics."""

    def __init__(self, server: Server, kind: str, req, prepared: list[Prepared], log_prompt=None,
                 principal: Principal | None = None, redaction: RequestRedaction | None = None):
        self.server, self.kind, self.req, self.prepared = server, kind, req, prepared
        self.redaction = redaction  # PII: the request was redacted; what leaves is restored (redaction.py)
        self.principal = principal
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self.log_prompt = log_prompt
        n = req.n
        family = server.family
        self.choices = [Choice(i * n + j, family.parser(p.tools, p.prompt_text) if kind == "chat" else None)
                        for i, p in enumerate(prepared) for j in range(n)]
        self.text = TokenText(server.llm.tokenizer, server.grammars)
        self.status = 200
        self.error: str | None = None
        # governance: the tool policy's gate over the model's calls, the verifier over its answers
        self.gate = (ToolGate(self, principal, server.policy.max_rounds)
                     if principal is not None and principal.rules is not None and any(p.tools for p in prepared)
                     else None)
        self.verification = server.verification if kind == "chat" else None
        self.extra_prompt_tokens = 0  # prompts of the rounds after a denied call
        self.removed_tools = sorted({t for p in prepared for t in p.removed_tools})
        if self.removed_tools:
            server.metrics.tools_removed(principal.name, len(self.removed_tools))
        self._queue: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []
        self._open = 0
        self._held: dict[int, list] = {}  # streamed events waiting for the verifier, per choice

    # ---- driving --------------------------------------------------------------------------------

    async def respond(self, request: Request):
        """Runs inside the handler's admission slot; a stream takes a slot of its own (the handler's
        is given back when it returns the response), held until the stream ends however it ends."""
        server = self.server
        if self.req.stream:
            server.in_flight += 1
            return StreamingResponse(self._stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                              **self._headers()})
        task = asyncio.ensure_future(self._collect())
        watcher = asyncio.ensure_future(wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task not in done:  # the client left: cancel, which aborts and frees its blocks
                task.cancel()
                self.status, self.error = 499, "client disconnected"
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
                self._finish()
                return Response(status_code=499)
            return task.result()
        finally:
            watcher.cancel()

    def _spawn(self, p: Prepared, request_id: str, choice_of) -> None:
        """Start one engine request whose deltas go to the choices ``choice_of(sample index)``."""
        queue = self._queue

        async def pump():
            try:
                async for d in self.server.generate(p, request_id):
                    d.index = choice_of(d.index)
                    await queue.put((request_id, d))
            except BaseException as e:
                await queue.put((request_id, e))
                raise
            finally:
                await queue.put((request_id, None))

        self._open += 1
        self._tasks.append(asyncio.ensure_future(pump()))

    async def retry(self, choice: Choice, extra: list[dict]) -> None:
        """Another round for one choice: its conversation plus ``extra`` (the denied calls and their
        errors), one sample, what is left of max_tokens. Raises APIError when it cannot be prepared."""
        from rung.serve.schemas import Message

        req = self.req
        budget = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        update = {"messages": list(req.messages) + [Message.model_validate(m) for m in extra], "n": 1}
        if budget is not None:
            left = budget - len(choice.token_ids)
            if left < 1:
                raise APIError(400, "no tokens left of max_tokens for another round")
            update["max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"] = left
        p = await self.server.off_loop(self.server.prepare_chat, req.model_copy(update=update), self.principal)
        self.extra_prompt_tokens += len(p.prompt_ids)
        choice.parser = self.server.family.parser(p.tools, p.prompt_text)
        self._spawn(p, f"{self.id}-c{choice.index}-r{len(self._tasks)}", lambda _, c=choice.index: c)

    async def _deltas(self):
        """Deltas of every engine request of this run, interleaved, within the request timeout
        (requests started while it runs, by ``retry``, included)."""
        timeout = self.server.config.request_timeout
        self._queue = queue = asyncio.Queue()
        n = self.req.n
        for i, p in enumerate(self.prepared):
            self._spawn(p, f"{self.id}-{i}", lambda j, i=i: i * n + j)
        deadline = time.monotonic() + timeout
        try:
            while self._open:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise APIError(408, f"the request timed out after {timeout:g} s", code="timeout")
                try:
                    i, item = await asyncio.wait_for(queue.get(), remaining)
                except asyncio.TimeoutError:
                    raise APIError(408, f"the request timed out after {timeout:g} s", code="timeout") from None
                if item is None:
                    self._open -= 1
                elif isinstance(item, BaseException):
                    if isinstance(item, asyncio.CancelledError):
                        continue
                    raise item
                else:
                    if self.first_token is None and item.token_ids:
                        self.first_token = time.perf_counter()
                    yield item
        finally:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _feed(self, d) -> tuple[Choice, list, bool]:
        """One delta into its choice: (the choice, the events to emit, whether the choice finished)."""
        choice = self.choices[d.index]
        events = choice.feed(d)
        if self.gate is None:
            return choice, events, bool(d.finish_reason)
        events, finished = await self.gate.feed(choice, events, d.finish_reason)
        return choice, events, finished

    async def _verify(self, choice: Choice) -> bool:
        """Score a finished answer (not a tool call, not a refusal); True when it was replaced by a refusal."""
        if self.verification is None or choice.calls or choice.refusal or choice.finish_reason is None:
            return False
        answer = "".join(choice.content).strip()
        if not answer:
            return False
        p = self.prepared[choice.index // self.req.n]
        passages = p.grounding.texts if getattr(p, "grounding", None) is not None else None  # --rag: what it saw
        question, sources = sources_of(p.messages or [], passages)
        verdict = await self.verification.check(question, answer, sources, self.server.metrics)
        choice.verdict = verdict.json()
        if verdict.action == "refused":
            choice.refuse(VERIFIER_REFUSAL, replace=True)
            return True
        return False

    def _headers(self) -> dict:
        out = {}
        if self.removed_tools:
            out["X-Rung-Policy-Removed-Tools"] = ",".join(self.removed_tools)
        verdicts = [c.verdict for c in self.choices if c.verdict]
        if verdicts:
            worst = min(verdicts, key=lambda v: (v["passed"], v["score"] if v["score"] is not None else -1))
            out["X-Rung-Verifier"] = worst["action"]
            if worst["score"] is not None:
                out["X-Rung-Verifier-Score"] = f"{worst['score']:.4f}"
        return out

    async def _collect(self):
        deltas = self._deltas()
        try:
            async for d in deltas:
                await self._feed(d)
            for c in self.choices:
                await self._verify(c)
        except BaseException as e:
            self._fail(e)
            self._finish()
            raise
        finally:
            await deltas.aclose()
        self._finish()
        return JSONResponse(self._whole(), headers=self._headers())

    async def _stream(self):
        deltas = self._deltas()
        try:
            if self.kind == "chat":
                for c in self.choices:
                    first = self._chunk(c, {"role": "assistant", "content": ""})
                    yield sse(add_rung(first, reply_fields(self.prepared)) if c.index == 0 else first)  # --rag sources
            async for d in deltas:
                for chunk in await self._chunks(d):
                    yield chunk
            opts = self.req.stream_options
            if opts is not None and opts.include_usage:
                yield sse({**self._envelope(), "choices": [], "usage": self._usage()})
            yield DONE
        except asyncio.CancelledError:  # the client left: the engine request was aborted on the way out
            self.status, self.error = 499, "client disconnected"
            raise
        except APIError as e:
            self._fail(e)
            yield sse(e.body())
            yield DONE
        except Exception as e:
            self._fail(e)
            yield sse(APIError(500, f"internal error: {type(e).__name__}: {e}").body())
            yield DONE
        finally:
            # accounting first: under a cancelled scope the await below may be interrupted, and
            # closing the deltas cancels the engine requests before its first await anyway
            self.server.release()
            self._finish()
            await deltas.aclose()

    # ---- shaping --------------------------------------------------------------------------------

    def _envelope(self) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.server.config.name}

    def _chunk(self, choice: Choice, delta: dict | None = None, finish: bool = False, logprobs=None,
               text: str | None = None) -> dict:
        if self.redaction is not None:  # placeholders back to the values, none cut in two
            delta, text = self.redaction.delta(choice.index, delta, text, finish)
        if self.kind == "chat":
            c = {"index": choice.index, "delta": delta or {}, "logprobs": logprobs,
                 "finish_reason": choice.openai_finish_reason if finish else None}
            if finish and choice.verdict:
                c["rung"] = {"verifier": choice.verdict}
        else:
            c = {"index": choice.index, "text": text or "", "logprobs": logprobs,
                 "finish_reason": choice.openai_finish_reason if finish else None}
        if finish and self.kind == "chat":
            add_rung(c, choice_fields(self.prepared[0], choice))  # --rag: what the answer cites
        if finish and choice.stop_reason is not None:
            c["stop_reason"] = choice.stop_reason
        return {**self._envelope(), "choices": [c]}

    async def _chunks(self, d) -> list[str]:
        choice = self.choices[d.index]
        before = len(choice.token_ids)
        choice, events, finished = await self._feed(d)
        lp = self._logprobs(choice, before)
        out = []
        if self.kind == "chat" and self.verification is not None:
            # held until the answer is verified: then sent as it came, or the refusal instead
            held = self._held.setdefault(choice.index, [])
            if events:
                held += [(e, lp if i == 0 else None) for i, e in enumerate(events)]
            elif lp is not None:
                held.append((None, lp))
            if not finished:
                return []
            events, self._held[choice.index] = [], []
            if await self._verify(choice):
                held = [(Event("content", choice.content[0]), None)]
            for e, lp in held:
                if e is not None:
                    out.append(self._chunk(choice, self._delta(choice, e), logprobs=lp))
                elif lp is not None:
                    out.append(self._chunk(choice, {}, logprobs=lp))
            out.append(self._chunk(choice, {}, finish=True))
        elif self.kind == "chat":
            for e in events:
                out.append(self._chunk(choice, self._delta(choice, e), logprobs=lp))
                lp = None
            if lp is not None:
                out.append(self._chunk(choice, {}, logprobs=lp))
            if finished:
                out.append(self._chunk(choice, {}, finish=True))
        else:
            text = "".join(e.text for e in events)
            if self.req.echo and before == 0:
                text = (self.prepared[d.index // self.req.n].prompt_text or "") + text
            if text or lp is not None or d.finish_reason:
                out.append(self._chunk(choice, text=text, finish=bool(d.finish_reason), logprobs=lp))
        opts = self.req.stream_options
        if opts is not None and opts.include_usage and opts.continuous_usage_stats:
            for chunk in out:
                chunk["usage"] = self._usage()
        return [sse(c) for c in out]

    @staticmethod
    def _delta(choice: Choice, e) -> dict:
        if e.kind == "tool_call":
            return {"tool_calls": [call_json(e.call, choice.calls.index(e.call))]}
        if e.kind == "reasoning":
            return {"reasoning_content": e.text}
        if choice.refusal and e.text.strip() == choice.refusal:
            return {"content": e.text, "refusal": choice.refusal}
        return {"content": e.text}

    def _logprobs(self, choice: Choice, start: int):
        want = self.req.logprobs
        if want is None or want is False or start == len(choice.token_ids):
            return None
        ids, lps = choice.token_ids[start:], choice.logprobs[start:]
        if self.kind == "chat":
            return {"content": chat_logprobs(ids, lps, self.req.top_logprobs or 0, self.text)}
        offset = sum(len(self.text(t)[0]) for t in choice.token_ids[:start])
        return completion_logprobs(ids, lps, want, self.text, offset)

    def _whole(self) -> dict:
        choices = []
        for c in self.choices:
            if self.kind == "chat":
                lp = ({"content": chat_logprobs(c.token_ids, c.logprobs, self.req.top_logprobs or 0, self.text)}
                      if self.req.logprobs else None)
                message = self.redaction.message(c.message()) if self.redaction else c.message()
                choices.append({"index": c.index, "message": message, "logprobs": lp,
                                "finish_reason": c.openai_finish_reason, "stop_reason": c.stop_reason,
                                **({"rung": {"verifier": c.verdict}} if c.verdict else {})})
            else:
                text = "".join(c.content)
                if self.req.echo:
                    text = (self.prepared[c.index // self.req.n].prompt_text or "") + text
                lp = (completion_logprobs(c.token_ids, c.logprobs, self.req.logprobs, self.text)
                      if self.req.logprobs is not None else None)
                text = self.redaction.text(text) if self.redaction else text
                choices.append({"index": c.index, "text": text, "logprobs": lp,
                                "finish_reason": c.openai_finish_reason, "stop_reason": c.stop_reason})
        if self.kind == "chat":  # --rag: each answer's citations, and the sources once
            for c, body in zip(self.choices, choices):
                add_rung(body, choice_fields(self.prepared[0], c))
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return add_rung({"id": self.id, "object": obj, "created": self.created, "model": self.server.config.name,
                         "choices": choices, "usage": self._usage()}, reply_fields(self.prepared))

    def _usage(self) -> dict:
        return usage(sum(len(p.prompt_ids) for p in self.prepared) + self.extra_prompt_tokens,
                     sum(len(c.token_ids) for c in self.choices))

    # ---- accounting -----------------------------------------------------------------------------

    def _fail(self, e: BaseException) -> None:
        if isinstance(e, APIError):
            self.status, self.error = e.status, e.message
        elif isinstance(e, asyncio.CancelledError):
            self.status, self.error = 499, "client disconnected"
        else:
            self.status, self.error = 500, f"{type(e).__name__}: {e}"

    def _finish(self) -> None:
        if getattr(self, "_finished", False):
            return
        self._finished = True
        now = time.perf_counter()
        latency = now - self.start
        ttft = None if self.first_token is None else self.first_token - self.start
        prompt = sum(len(p.prompt_ids) for p in self.prepared) + self.extra_prompt_tokens
        generated = sum(len(c.token_ids) for c in self.choices)
        reasons = [c.openai_finish_reason or ("abort" if self.status != 200 else None) for c in self.choices]
        if self.status == 200:
            self.server.metrics.finished(reasons[0] or "stop", prompt, generated, ttft, latency)
        else:
            self.server.metrics.finished("abort" if self.status == 499 else "error", prompt, generated, ttft, latency)
        prompt_field = None
        if self.server.config.log_prompts:
            prompt_field = self.log_prompt
        redacted = None
        if self.redaction is not None:
            redacted = dict(self.redaction.counts)
            self.server.metrics.redacted(redacted)
        logs.request_line(id=self.id, endpoint=self.kind, model=self.server.config.name, status=self.status,
                          stream=bool(self.req.stream), n=self.req.n, prompt_tokens=prompt,
                          completion_tokens=generated, latency_s=round(latency, 4),
                          ttft_s=None if ttft is None else round(ttft, 4),
                          tool_calls=sum(len(c.calls) for c in self.choices), finish_reasons=reasons,
                          user=self.req.user, error=self.error, prompt=prompt_field, redacted=redacted,
                          **self._governance_fields())

    def _governance_fields(self) -> dict:
        out = {}
        if self.principal is not None:
            out["key"] = self.principal.name
        if self.removed_tools:
            out["tools_removed"] = self.removed_tools
        if self.gate is not None and self.gate.denied:
            out.update(policy_denied=self.gate.denied, policy_rules=self.gate.rules_fired,
                       policy_refused=self.gate.refused)
        verdicts = [c.verdict for c in self.choices if c.verdict]
        if verdicts:
            out["verifier"] = [{k: v[k] for k in ("score", "action")} for v in verdicts]
        return out
