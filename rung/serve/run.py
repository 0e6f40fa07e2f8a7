"""One HTTP request's generation: ``Run`` drives its engine requests and answers, whole or streamed.

A run starts one engine request per prompt (``n`` samples each), merges their deltas into its
choices within the request timeout, and ends in exactly one JSON log line and one set of metric
updates, whether it finished, failed, timed out or its client left. On the way out each reply
passes the governance steps, each in its own module: the tool gate and the verifier
(governance.py's ``RunGovernance``), the restoring of redacted values (redaction.py) and the
retrieval's ``rung`` fields (grounding.py); responses.py's ``OpenAIReply`` shapes what is sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from rung.engine.engine import Delta
from rung.govern.policy import Principal
from rung.serve import logs
from rung.serve.errors import APIError
from rung.serve.governance import RunGovernance
from rung.serve.grounding import add_rung, choice_fields, reply_fields
from rung.serve.redaction import RequestRedaction
from rung.serve.responses import DONE, Choice, OpenAIReply, TokenText, event_delta, sse, usage, whole_calls
from rung.serve.schemas import Message
from rung.serve.server import Prepared, Server, wait_disconnect
from rung.serve.tracing import Trace


_TIMED_OUT = object()  # what the run's timer puts in its queue when the request timeout has passed


class Run:
    """One HTTP request's generation: its engine requests (one per prompt), its choices, its log
    line and metrics."""

    def __init__(self, server: Server, kind: str, req, prepared: list[Prepared], log_prompt=None,
                 principal: Principal | None = None, redaction: RequestRedaction | None = None,
                 trace: Trace | None = None):
        self.server, self.kind, self.req, self.prepared = server, kind, req, prepared
        self.trace = trace or Trace()  # its phases, for --otlp-traces-endpoint (tracing.py)
        for p in prepared:
            for phase in p.phases:
                self.trace.add(*phase)
        self.redaction = redaction  # PII: the request was redacted; what leaves is restored (redaction.py)
        self.principal = principal
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self.log_prompt = log_prompt
        n = req.n
        family = server.family
        chat = kind != "completion"  # "chat", or "responses" (responses_run.py): a chat reply in another shape
        one_call = chat and getattr(req, "parallel_tool_calls", True) is False
        self.choices = [Choice(i * n + j, family.parser(p.tools, p.prompt_text, p.removed_tools)
                               if chat else None, max_calls=1 if one_call else None)
                        for i, p in enumerate(prepared) for j in range(n)]
        self.reply = OpenAIReply(kind, self.id, self.created, server.config.name, req, prepared,
                                 TokenText(server.llm.tokenizer, server.grammars))
        self.status = 200
        self.error: str | None = None
        # the tool policy's gate over the model's calls, the verifier over its answers
        self.governance = RunGovernance(self, principal, server.verification if chat else None)
        self.extra_prompt_tokens = 0  # prompts of the rounds after a denied call
        self.cached_tokens: dict[str, int] = {}  # engine request id → prompt tokens the prefix cache served
        self._queue: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []
        self._open = 0
        self._first_chunk: float | None = None  # streamed: when the first token's chunk went out

    # ---- driving --------------------------------------------------------------------------------

    async def respond(self, request: Request):
        """Runs inside the handler's admission slot; a stream takes a slot of its own (the handler's
        is given back when it returns the response), held until the stream ends however it ends."""
        server = self.server
        if self.req.stream:
            server.in_flight += 1
            return StreamingResponse(self._stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                              **self.governance.headers(self.choices)})
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
        req = self.req
        budget = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        update = {"messages": list(req.messages) + [Message.model_validate(m) for m in extra], "n": 1}
        if budget is not None:
            left = budget - len(choice.token_ids)
            if left < 1:
                raise APIError(400, "no tokens left of max_tokens for another round")
            update["max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"] = left
        started = time.perf_counter()
        p = await self.server.off_loop(self.server.prepare_chat, req.model_copy(update=update), self.principal)
        self.trace.add("tool_policy", started, choice=choice.index, denied=len(extra))
        self.extra_prompt_tokens += len(p.prompt_ids)
        choice.parser = self.server.family.parser(p.tools, p.prompt_text, p.removed_tools)
        self._spawn(p, f"{self.id}-c{choice.index}-r{len(self._tasks)}", lambda _, c=choice.index: c)

    def _deltas(self, interval: int = 1):
        """Deltas of every engine request of this run, interleaved, within the request timeout
        (requests started while it runs, by ``retry``, included); with ``interval`` > 1 (a
        stream's --stream-interval) merged as ``coalesced`` merges them."""
        deltas = self._engine_deltas()
        return deltas if interval <= 1 else coalesced(deltas, interval)

    async def _engine_deltas(self):
        timeout = self.server.config.request_timeout
        self._queue = queue = asyncio.Queue()
        n = self.req.n
        for i, p in enumerate(self.prepared):
            self._spawn(p, f"{self.id}-{i}", lambda j, i=i: i * n + j)
        # one timer for the whole run puts a marker in the queue (not a timeout around each wait: a
        # timer handle made and cancelled per token is a tenth of the event loop's work per token)
        timer = asyncio.get_running_loop().call_later(timeout, queue.put_nowait, (None, _TIMED_OUT))
        try:
            while self._open:
                i, item = queue.get_nowait() if not queue.empty() else await queue.get()
                if item is _TIMED_OUT:
                    raise APIError(408, f"the request timed out after {timeout:g} s", code="timeout")
                if item is None:
                    self._open -= 1
                elif isinstance(item, BaseException):
                    if isinstance(item, asyncio.CancelledError):
                        continue
                    raise item
                else:
                    if self.first_token is None and item.token_ids:
                        self.first_token = time.perf_counter()
                    if item.timings is not None:  # a sample's last delta: its queue, prefill and decode
                        self.trace.engine(item.timings)
                    if item.num_cached_tokens is not None:  # a prompt counts once, whatever its samples
                        known = self.cached_tokens.get(item.request_id, 0)
                        self.cached_tokens[item.request_id] = max(known, item.num_cached_tokens)
                    yield item
        finally:
            timer.cancel()
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _feed(self, d) -> tuple[Choice, list, bool]:
        """One delta into its choice: (the choice, the events to emit, whether the choice finished)."""
        choice = self.choices[d.index]
        events, finished = await self.governance.gate_events(choice, choice.feed(d), d.finish_reason)
        return choice, events, finished

    async def _collect(self):
        deltas = self._deltas()
        try:
            async for d in deltas:
                await self._feed(d)
            for c in self.choices:
                await self.governance.verify(c)
        except BaseException as e:
            self._fail(e)
            self._finish()
            raise
        finally:
            await deltas.aclose()
        self._finish()
        return JSONResponse(self._whole(), headers=self.governance.headers(self.choices))

    async def _stream(self):
        deltas = self._deltas(self.server.config.stream_interval)
        try:
            if self.kind == "chat":
                for c in self.choices:
                    first = self._chunk(c, {"role": "assistant", "content": ""})
                    yield sse(add_rung(first, reply_fields(self.prepared)) if c.index == 0 else first)  # --rag sources
            async for d in deltas:
                for chunk in await self._chunks(d):
                    if self._first_chunk is None:
                        self._first_chunk = time.perf_counter()
                    yield chunk
            opts = self.req.stream_options
            if opts is not None and opts.include_usage:
                yield sse({**self.reply.envelope(), "choices": [], "usage": self._usage()})
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

    # ---- what is sent ---------------------------------------------------------------------------

    def _rung(self, choice: Choice) -> dict:
        """A finished chat choice's ``rung`` fields: the verifier's verdict, what the answer cites (--rag)."""
        if self.kind != "chat":
            return {}
        verdict = {"verifier": choice.verdict} if choice.verdict else {}
        return {**verdict, **choice_fields(self.prepared[0], choice)}

    def _chunk(self, choice: Choice, delta: dict | None = None, finish: bool = False, logprobs=None,
               text: str | None = None) -> dict:
        if self.redaction is not None:  # placeholders back to the values, none cut in two
            delta, text = self.redaction.delta(choice.index, delta, text, finish)
        return self.reply.chunk(choice, delta, finish, logprobs, text, self._rung(choice) if finish else None)

    async def _chunks(self, d) -> list[str]:
        """One delta's stream chunks (none while the verifier holds the answer back)."""
        choice = self.choices[d.index]
        before = len(choice.token_ids)
        choice, events, finished = await self._feed(d)
        lp = self.reply.logprobs(choice, before)
        out = []
        if self.kind == "chat":
            if self.redaction is not None:  # a call's arguments are restored whole: sent once complete
                events = whole_calls(events)
            # the delta's logprobs go with its first event, or alone
            pairs = [(e, lp if i == 0 else None) for i, e in enumerate(events)]
            if not events and lp is not None:
                pairs = [(None, lp)]
            for e, e_lp in await self.governance.release(choice, pairs, finished):
                delta = event_delta(choice, e) if e is not None else {}
                if delta is not None or e_lp is not None:
                    out.append(self._chunk(choice, delta or {}, logprobs=e_lp))
            if finished:
                out.append(self._chunk(choice, {}, finish=True))
        else:
            text = "".join(e.text for e in events)
            if self.req.echo and before == 0:
                text = self.reply.prompt_text(d.index) + text
            if text or lp is not None or d.finish_reason:
                out.append(self._chunk(choice, text=text, finish=bool(d.finish_reason), logprobs=lp))
        opts = self.req.stream_options
        if opts is not None and opts.include_usage and opts.continuous_usage_stats:
            for chunk in out:
                chunk["usage"] = self._usage()
        return [sse(c) for c in out]

    def _whole(self) -> dict:
        choices = []
        for c in self.choices:
            body = self.reply.choice(c)
            if self.redaction is not None:  # placeholders back to the values
                body = self.redaction.choice(body)
            choices.append(add_rung(body, self._rung(c)))
        return add_rung(self.reply.whole(choices, self._usage()), reply_fields(self.prepared))

    def _usage(self) -> dict:
        return usage(sum(len(p.prompt_ids) for p in self.prepared) + self.extra_prompt_tokens,
                     sum(len(c.token_ids) for c in self.choices), sum(self.cached_tokens.values()))

    # ---- accounting -----------------------------------------------------------------------------

    def _export(self, reasons: list, prompt: int, generated: int, end: float) -> None:
        """This request's trace, with OpenTelemetry's GenAI attributes (tracing.py)."""
        req = self.req
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        attributes = {"gen_ai.response.id": self.id, "gen_ai.response.model": self.server.config.name,
                      "gen_ai.request.max_tokens": max_tokens, "gen_ai.request.temperature": req.temperature,
                      "gen_ai.request.top_p": req.top_p, "gen_ai.request.seed": req.seed,
                      "gen_ai.usage.input_tokens": prompt, "gen_ai.usage.output_tokens": generated,
                      "gen_ai.response.finish_reasons": [r or "" for r in reasons],
                      "http.response.status_code": self.status, "rung.stream": bool(req.stream)}
        if self.error is not None:
            attributes["error.type"] = str(self.status)
        operation = "text_completion" if self.kind == "completion" else "chat"  # a Responses run is a chat
        self.server.tracing.export(self.trace, operation, self.server.config.name, attributes, end=end,
                                   prompt=self.log_prompt, error=self.error)

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
        if self._first_chunk is not None:
            self.trace.add("stream", self._first_chunk, now)
        if self.server.tracing is not None:
            self._export(reasons, prompt, generated, now)
        logs.request_line(id=self.id, endpoint=self.kind, model=self.server.config.name, status=self.status,
                          stream=bool(self.req.stream), n=self.req.n, prompt_tokens=prompt,
                          completion_tokens=generated, latency_s=round(latency, 4),
                          ttft_s=None if ttft is None else round(ttft, 4),
                          tool_calls=sum(len(c.calls) for c in self.choices), finish_reasons=reasons,
                          user=self.req.user, error=self.error, prompt=prompt_field, redacted=redacted,
                          **self.governance.log_fields(self.choices))


async def coalesced(deltas, interval: int):
    """``deltas`` with each sample's deltas after its first merged until they hold ``interval``
    tokens or the sample ends: the first token still leaves at once (time to first token), then
    one chunk per ``interval`` tokens instead of one per token for the event loop, the socket and
    the client to handle. Closing this closes ``deltas`` (which aborts the engine requests)."""
    held: dict[tuple[str, int], Delta] = {}
    started: set[tuple[str, int]] = set()
    try:
        async for d in deltas:
            key = (d.request_id, d.index)
            if key in held:
                d = merged(held.pop(key), d)
            if key in started and d.finish_reason is None and len(d.token_ids) < interval:
                held[key] = d
                continue
            if d.token_ids:
                started.add(key)
            yield d
    finally:
        await deltas.aclose()


def merged(a: Delta, b: Delta) -> Delta:
    """Two consecutive deltas of one sample as one: the later one's fields (finish, timings, ...)
    with the text, tokens and logprobs of both."""
    logprobs = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
    return dataclasses.replace(b, text=a.text + b.text, token_ids=a.token_ids + b.token_ids, logprobs=logprobs)
