"""``POST /v1/responses``, output side: one run's reply as Responses output items, whole or as the
documented stream of events.

The reply comes from the same engine run and the same family parser as a chat completion
(run.py's ``Run``: limits, timeout, governance, redaction, the log line and metrics); only its
shape differs. ``OutputItems`` turns the parser's events (reasoning, content, tool calls) into
output items in the order the model wrote them (a ``reasoning`` item, a ``message`` item with
``output_text`` parts, one ``function_call`` item per call) and into the stream events that build
them::

    response.created, response.in_progress,
    per item: response.output_item.added,
        message / reasoning: response.content_part.added, response.output_text.delta... (or
            response.reasoning_text.delta...), response.output_text.done, response.content_part.done
        function_call: response.function_call_arguments.delta..., response.function_call_arguments.done
    response.output_item.done, ..., response.completed

Every event carries ``sequence_number`` (0, 1, 2, ...). A whole response is built by the same
``OutputItems`` from the same events, so a stream's deltas always add up to the whole reply's text.
A reply cut by ``max_output_tokens`` ends with ``response.completed`` whose status is
``incomplete`` (``incomplete_details.reason``), so clients that wait for ``response.completed``
(the openai package's ``responses.stream``) finish. A failure mid-stream sends an ``error`` event
and ``response.failed``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid

from fastapi.responses import JSONResponse

from rung.serve.errors import TYPES, APIError
from rung.serve.reasoning import Event, ToolCallOut
from rung.serve.redaction import redaction_for
from rung.serve.responses import call_json, chat_logprobs, whole_calls
from rung.serve.responses_api import input_messages, renamed, to_chat, wants_logprobs
from rung.serve.responses_schemas import ResponsesRequest
from rung.serve.run import Run

_TEXT_EVENTS = {"output_text": "response.output_text", "reasoning_text": "response.reasoning_text",
                "refusal": "response.refusal"}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputItems:
    """Reply events → output items, and the stream events (without sequence numbers) that build them."""

    def __init__(self):
        self.items: list[dict] = []
        self.open: dict | None = None  # the item being written
        self.part: dict | None = None  # the open item's content part being written
        self._events: list[dict] = []

    def add(self, e: Event, refusal: str | None = None, logprobs: list[dict] | None = None) -> None:
        """One event; ``logprobs``: the entries of the tokens that wrote a content event's text."""
        if e.kind == "reasoning":
            self._text("reasoning", "reasoning_text", e.text)
        elif e.kind == "content":
            # a governance refusal (the verifier's, the policy's) is a refusal part, as chat marks it
            refused = refusal is not None and e.text.strip() == refusal
            self._text("message", "refusal" if refused else "output_text", e.text, None if refused else logprobs)
        elif e.kind in ("tool_call", "call_end"):  # a whole call, or the end of a streamed one
            self._call(e.call, None)
        elif e.call is not None:  # a piece of a call's arguments, from a parser that streams them
            self._call(e.call, e.text)

    def finish(self, incomplete: bool = False) -> None:
        """Close the open item (``incomplete`` when the reply was cut off)."""
        self._close_item("incomplete" if incomplete else "completed")

    def take(self) -> list[dict]:
        """The stream events since the last take."""
        events, self._events = self._events, []
        return events

    # ---- items --------------------------------------------------------------------------------

    def _emit(self, kind: str, **fields) -> None:
        self._events.append({"type": kind, **fields})

    def _open_item(self, item: dict) -> None:
        self._close_item("completed")
        self.items.append(item)
        self.open = item
        self._emit("response.output_item.added", output_index=len(self.items) - 1, item=copy.deepcopy(item))

    def _close_item(self, status: str) -> None:
        item = self.open
        if item is None:
            return
        self._close_part()
        item["status"] = status
        self._emit("response.output_item.done", output_index=len(self.items) - 1, item=copy.deepcopy(item))
        self.open = None

    def _text(self, item_type: str, part_type: str, text: str, logprobs: list[dict] | None = None) -> None:
        if not text:
            return
        if self.open is None or self.open["type"] != item_type:
            self._open_item({"id": _id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                             "content": []} if item_type == "message" else
                            {"id": _id("rs"), "type": "reasoning", "summary": [], "content": [],
                             "status": "in_progress"})
        if self.part is None or self.part["type"] != part_type:
            self._close_part()
            part = ({"type": "output_text", "text": "", "annotations": [], "logprobs": []} if part_type == "output_text"
                    else {"type": "refusal", "refusal": ""} if part_type == "refusal"
                    else {"type": "reasoning_text", "text": ""})
            self.open["content"].append(part)
            self.part = part
            self._emit("response.content_part.added", **self._where(), part=copy.deepcopy(part))
        key = "refusal" if part_type == "refusal" else "text"
        self.part[key] += text
        extra = {}
        if part_type == "output_text":
            self.part["logprobs"] += logprobs or []
            extra = {"logprobs": copy.deepcopy(logprobs or [])}
        self._emit(_TEXT_EVENTS[part_type] + ".delta", **self._where(), delta=text, **extra)

    def _close_part(self) -> None:
        part = self.part
        if part is None:
            return
        kind = part["type"]
        if kind == "refusal":
            self._emit("response.refusal.done", **self._where(), refusal=part["refusal"])
        else:
            extra = {"logprobs": copy.deepcopy(part["logprobs"])} if kind == "output_text" else {}
            self._emit(_TEXT_EVENTS[kind] + ".done", **self._where(), text=part["text"], **extra)
        self._emit("response.content_part.done", **self._where(), part=copy.deepcopy(part))
        self.part = None

    def _where(self) -> dict:
        return {"item_id": self.open["id"], "output_index": len(self.items) - 1,
                "content_index": len(self.open["content"]) - 1}

    def _call(self, call: ToolCallOut, piece: str | None) -> None:
        """A call's arguments: a piece of them (``piece``), or the whole call (None), which ends it."""
        item = self.open
        if item is None or item["type"] != "function_call" or item["call_id"] != call.id:
            item = {"id": _id("fc"), "type": "function_call", "call_id": call.id, "name": call.name, "arguments": "",
                    "status": "in_progress"}
            self._open_item(item)
        where = {"item_id": item["id"], "output_index": len(self.items) - 1}
        if piece is not None:
            if piece:  # a first piece may carry only the call's id and name
                item["arguments"] += piece
                self._emit("response.function_call_arguments.delta", **where, delta=piece)
            return
        sent = item["arguments"]
        rest = call.arguments[len(sent):] if call.arguments.startswith(sent) else call.arguments
        if rest:
            self._emit("response.function_call_arguments.delta", **where, delta=rest)
        item["arguments"] = call.arguments
        self._emit("response.function_call_arguments.done", **where, arguments=call.arguments)
        self._close_item("completed")


# ---- one request ----------------------------------------------------------------------------------


async def respond(server, request, req: ResponsesRequest, principal, trace=None):
    """Answer one parsed Responses request (inside the handler's admission slot)."""
    history = None
    if req.previous_response_id is not None:
        stored = server.responses.get(req.previous_response_id)
        if stored is None:
            shown = req.previous_response_id[:200]
            raise APIError(404, f"Previous response with id '{shown}' not found (unknown, expired, or not stored: "
                                f"send store: true to keep a response)", "previous_response_id",
                           "previous_response_not_found")
        history = stored.messages
    chat, conversation = await server.off_loop(to_chat, req, history)
    started = time.perf_counter()
    redaction = await redaction_for(server, chat)
    if redaction is not None and trace is not None:
        trace.add("redaction", started, entities=sum(redaction.counts.values()))
    chat = redaction.request if redaction else chat
    try:
        prepared = await server.off_loop(server.prepare_chat, chat, principal)
    except APIError as e:
        raise renamed(e) from None
    run = ResponsesRun(server, req, chat, prepared, conversation, principal, redaction, trace)
    return await run.respond(request)


class ResponsesRun(Run):
    """A chat run whose reply leaves as a Responses object or event stream (and may be stored)."""

    def __init__(self, server, req: ResponsesRequest, chat, prepared, conversation: list[dict], principal,
                 redaction, trace=None):
        super().__init__(server, "responses", chat, [prepared], log_prompt=prepared.prompt_text, principal=principal,
                         redaction=redaction, trace=trace)
        self.id = _id("resp")
        self.request = req
        self.conversation = conversation  # as the client sent it (before redaction): what a stored response keeps
        self.output = OutputItems()
        self.sequence = 0
        self.reasoning_tokens = 0
        self._unplaced = 0  # tokens of deltas that gave no event yet (a tag held back by the parser)
        self._restoring: str | None = None
        self.logprobs = wants_logprobs(req)
        self._unplaced_lp: list[dict] = []  # the logprob entries of those tokens

    # ---- driving --------------------------------------------------------------------------------

    async def _feed(self, d):
        """(choice, [(event, logprob entries or None)], finished): the tokens since the last event go
        with the next one, and their logprobs with it when it is content (output text)."""
        choice = self.choices[d.index]
        before = len(choice.token_ids)
        choice, events, finished = await super()._feed(d)
        self._unplaced += len(choice.token_ids) - before
        if self.logprobs and before < len(choice.token_ids):  # chat's entries: token, logprob, bytes, top_logprobs
            self._unplaced_lp += chat_logprobs(choice.token_ids[before:], choice.logprobs[before:],
                                               self.request.top_logprobs or 0, self.reply.text)
        if events:  # the tokens that wrote reasoning, tags included, are reasoning tokens
            if all(e.kind == "reasoning" for e in events):
                self.reasoning_tokens += self._unplaced
            self._unplaced = 0
        pairs = []
        for e in events:
            lp = None
            if self._unplaced_lp and e.kind == "content":
                lp, self._unplaced_lp = self._unplaced_lp, []
            elif e.kind != "content":
                self._unplaced_lp = []  # a reasoning or call event's tokens: not the output text's
            pairs.append((e, lp))
        return choice, pairs, finished

    async def _collect(self):
        deltas = self._deltas()
        events: list[tuple[Event, list | None]] = []
        choice = self.choices[0]
        try:
            async for d in deltas:
                events += (await self._feed(d))[1]
            if await self.governance.verify(choice):  # the answer was replaced by a refusal
                events = [p for p in events if p[0].kind != "content"] + [(Event("content", choice.refusal), None)]
        except BaseException as e:
            self._fail(e)
            self._finish()
            raise
        finally:
            await deltas.aclose()
        self._finish()
        for e, lp in self._restored(events, finished=True):
            self.output.add(e, choice.refusal, lp)
        self.output.finish(self._incomplete() is not None)
        body = self._response()
        self._store(body)
        return JSONResponse(body, headers=self.governance.headers(self.choices))

    async def _stream(self):
        deltas = self._deltas(self.server.config.stream_interval)
        try:
            yield self._sse({"type": "response.created", "response": self._response("in_progress")})
            yield self._sse({"type": "response.in_progress", "response": self._response("in_progress")})
            async for d in deltas:
                choice, pairs, finished = await self._feed(d)
                pairs = await self.governance.release(choice, pairs, finished)
                for e, lp in self._restored(pairs, finished):
                    self.output.add(e, choice.refusal, lp)
                for event in self.output.take():
                    if self._first_chunk is None:  # the trace's stream span starts here
                        self._first_chunk = time.perf_counter()
                    yield self._sse(event)
            self.output.finish(self._incomplete() is not None)
            for event in self.output.take():
                yield self._sse(event)
            body = self._response()
            self._store(body)
            yield self._sse({"type": "response.completed", "response": body})
        except asyncio.CancelledError:  # the client left: the engine request was aborted on the way out
            self.status, self.error = 499, "client disconnected"
            raise
        except Exception as e:
            error = e if isinstance(e, APIError) else APIError(500, f"internal error: {type(e).__name__}: {e}")
            self._fail(error)
            code = error.code or TYPES.get(error.status, "server_error")
            yield self._sse({"type": "error", "code": code, "message": error.message, "param": error.param})
            yield self._sse({"type": "response.failed",
                             "response": self._response("failed", {"code": code, "message": error.message})})
        finally:
            self.server.release()
            self._finish()
            await deltas.aclose()

    # ---- what is sent ---------------------------------------------------------------------------

    def _sse(self, event: dict) -> str:
        event = {**event, "sequence_number": self.sequence}
        self.sequence += 1
        return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"

    def _incomplete(self) -> dict | None:
        reason = self.choices[0].finish_reason
        if reason == "length":
            return {"reason": "max_output_tokens"}
        if reason == "content_filter":
            return {"reason": "content_filter"}
        return None

    def _response(self, status: str | None = None, error: dict | None = None) -> dict:
        """The response object: in progress (no output yet), failed, or finished with its output and usage."""
        req = self.request
        done = status is None
        incomplete = self._incomplete() if done else None
        if done:
            status = "incomplete" if incomplete else "completed"
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else None
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "background": False, "completed_at": int(time.time()) if status == "completed" else None,
            "error": error, "incomplete_details": incomplete, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "max_tool_calls": None, "metadata": req.metadata or {},
            "model": self.server.config.name, "output": copy.deepcopy(self.output.items) if done else [],
            "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
            "service_tier": "default", "store": bool(req.store),
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": fmt or {"type": "text"}},
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
            "tools": req.tools or [], "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": "disabled",
            "usage": self._responses_usage() if done else None, "user": req.user,
        }

    def _responses_usage(self) -> dict:
        used = self._usage()
        cached = used["prompt_tokens_details"]["cached_tokens"]
        return {"input_tokens": used["prompt_tokens"], "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": used["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": min(self.reasoning_tokens, used["completion_tokens"])},
                "total_tokens": used["total_tokens"]}

    def _store(self, body: dict) -> None:
        """With store: true, keep the conversation through this reply for previous_response_id."""
        if self.request.store:
            self.server.responses.put(self.id, self.conversation + input_messages(body["output"]), body)

    # ---- redaction ------------------------------------------------------------------------------

    def _restored(self, pairs: list[tuple[Event, list | None]], finished: bool) -> list[tuple[Event, list | None]]:
        """(event, logprobs) pairs with redacted values restored (a placeholder cut between deltas is
        held, then sent whole; the restored text's tokens are not the model's: no logprobs);
        unchanged without redaction. A call's argument pieces wait for the whole call."""
        r = self.redaction
        if r is None:
            return pairs
        return [(e, None) for e in self._restored_events([e for e, _ in pairs], finished)]

    def _restored_events(self, events: list[Event], finished: bool) -> list[Event]:
        r = self.redaction
        events = whole_calls(events)  # a call's arguments are restored whole
        out: list[Event] = []
        for e in events:
            if e.kind in ("content", "reasoning"):
                key = "content" if e.kind == "content" else "reasoning_content"
                if self._restoring not in (None, key):
                    out += self._flush()
                self._restoring = key
                text = r.delta(0, {key: e.text}, None, False)[0].get(key)
                if text:
                    out.append(Event(e.kind, text))
            elif e.kind == "tool_call":
                out += self._flush()
                call = r.delta(0, {"tool_calls": [call_json(e.call)]}, None, False)[0]["tool_calls"][0]
                out.append(Event("tool_call", call=ToolCallOut(e.call.name, call["function"]["arguments"], e.call.id)))
        if finished:
            out += self._flush()
        return out

    def _flush(self) -> list[Event]:
        delta, _ = self.redaction.delta(0, None, None, True)
        self._restoring = None
        return [Event("content" if key == "content" else "reasoning", text) for key, text in (delta or {}).items()
                if text and key in ("content", "reasoning_content")]
