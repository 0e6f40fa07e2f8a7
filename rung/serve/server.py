"""The server's state: the model (loaded in the background, so /health answers 503 meanwhile), the
engine front, the limits, and the translation of one validated request into engine work: prompt
token ids, SamplingParams (with the grammar constraint, if any) and the reply parser.

Checks run in this order: the body's size (413), admission (429, before any CPU work is spent), the
body (400), the model name (404), readiness (503), then what only the rendered and tokenized prompt
can tell (400: too long, max_tokens too large, a bad schema). Everything after admission that costs
CPU runs on a few prepare threads (``off_loop``), never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rung.serve.errors import APIError, bad_request
from rung.serve.family import Family, family_for
from rung.serve.grounding import ground_chat
from rung.serve.responses_store import ResponseStore
from rung.serve.schemas import ChatCompletionRequest, CompletionRequest
from rung.serve.structured import GrammarError, check_json_schema

# A JSON schema (a response format or a tool's parameters) is checked by jsonschema and compiled by
# llguidance, both by recursion and both in time that grows faster than the schema: bound its
# nesting (objects and arrays inside one another: 31 nested objects with their "properties") and
# its size (objects and arrays in all: ~4000 one-line properties, seconds to check and compile).
MAX_SCHEMA_DEPTH = 64
MAX_SCHEMA_NODES = 4096


@dataclass
class ServeConfig:
    model: str = "smollm2-135m"
    served_model_name: str | None = None  # the name clients send (default: the --model argument)
    api_key: str | None = None
    max_concurrent: int = 64  # requests in flight (each may have n samples); more get 429
    request_timeout: float = 600.0  # seconds, from arrival to the last token
    stream_interval: int = 1  # tokens a streamed chunk carries at most (SGLang's name); the first goes alone
    max_model_len: int | None = None  # default: the model's context
    max_tokens: int | None = None  # the most a request may ask for (default: what the context leaves)
    max_request_bytes: int = 8 * 2**20  # bigger bodies get 413
    prepare_threads: int = 4  # threads that parse, render, tokenize and compile requests (off the event loop)
    log_prompts: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    tensor_parallel_size: int = 1  # ranks on this host (rung/distributed/): this process is rank 0
    seed: int = 0
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields
    rag: Any = None  # a rung.rag.Index: chat requests are grounded in it (rung/serve/grounding.py)
    rag_k: int = 4  # passages per request (a request's "rag": {"k": ...} overrides)
    rag_max_chars: int = 3000  # characters of passages per request
    policy: Any = None  # a rung.govern.policy.Policy: tool-use rules per API key
    verifier: str | None = None  # a verifier spec (rung.govern.verify), loaded with the model
    verify_threshold: float = 0.5
    verify_action: str = "refuse"  # "refuse" | "flag"
    redact: bool = False  # redact PII of every request (rung/serve/redaction.py)
    redact_entities: tuple[str, ...] | None = None  # Presidio entity types (default: rung.govern.redact's)
    otlp_traces_endpoint: str | None = None  # OpenTelemetry traces (rung/serve/tracing.py), vLLM's flag
    # stored responses of POST /v1/responses (store: true), for previous_response_id (responses_store.py)
    responses_store_size: int = 1000  # responses kept at most; the oldest go first
    responses_store_ttl: float = 3600.0  # seconds a stored response is kept
    responses_store_bytes: int = 256 * 2**20  # text of all stored responses at most

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


@dataclass
class Prepared:
    """One engine request and what its reply needs."""

    prompt_ids: list[int]
    params: Any  # SamplingParams
    prompt_text: str | None = None
    tools: list[dict] | None = None
    thinking: bool = False
    removed_tools: list[str] = field(default_factory=list)  # declared tools the key's policy took out
    messages: list[dict] | None = None  # the conversation as sent (what a verifier reads its sources from)
    grounding: Any = None  # rung.rag.Grounding with --rag: the passages the model was given (grounding.texts)
    phases: list = field(default_factory=list)  # (name, start, end): template and grammar, for the trace


class _Admits:
    """``with x.admit():`` holds a slot of ``x.acquire()`` until the block ends."""

    @contextlib.contextmanager
    def admit(self):
        self.acquire()
        try:
            yield
        finally:
            self.release()


class Gate(_Admits):
    """Admission shared by every model of one server: --max-concurrent counts the requests to all
    of them, and one pool of prepare threads serves them all."""

    def __init__(self, limit: int, threads: int):
        self.limit, self.in_flight = limit, 0
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="rung-prepare")

    def acquire(self) -> None:
        """A slot among --max-concurrent, or 429 at once (clients back off and retry)."""
        if self.in_flight >= self.limit:
            raise APIError(429, f"the server is at its limit of {self.limit} concurrent requests; "
                                "retry later", code="too_many_requests", headers={"Retry-After": "1"})
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    async def off_loop(self, work, *args):
        """``work(*args)`` on a prepare thread, so the event loop keeps answering (/health, streams)
        while a big request is parsed, rendered, tokenized or compiled. Call it inside ``admit()``.
        If the caller is cancelled (its client left), the work still holds a slot until it ends:
        abandoned requests cannot queue more work than --max-concurrent."""
        return await _shielded(self.pool, work, args, self)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


async def _shielded(pool, work, args, holder):
    future = asyncio.get_running_loop().run_in_executor(pool, work, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        holder.in_flight += 1

        def release_after(f) -> None:
            if not f.cancelled():
                f.exception()  # retrieved: an abandoned request's error is no one's
            holder.release()

        future.add_done_callback(release_after)
        raise


class Server(_Admits):
    """One model: its engine, template, grammars and limits. Several share a ``Gate`` when one
    server serves several models (rung/serve/models.py)."""

    def __init__(self, config: ServeConfig, metrics=None, gate: Gate | None = None):
        from rung.serve.metrics import Metrics

        self.config = config
        self.metrics = metrics or Metrics(config.name)
        self.gate = gate or Gate(config.max_concurrent, config.prepare_threads)
        self._in_flight = 0  # this model's requests: handlers, streams, abandoned prepare work
        self.llm = None
        self.engine = None  # AsyncEngine
        self.family: Family | None = None
        self.template = None
        self.grammars = None
        self.grammar_error: str | None = None
        self.load_error: BaseException | None = None
        self.loaded = threading.Event()
        self.started = int(time.time())
        self.policy = config.policy
        self.verification = None  # a rung.serve.governance.Verification once loaded
        self.redactor = None  # a rung.govern.redact.Redactor with --redact, loaded with the model
        self._redactors: dict = {}  # those requests asked for, by entity types
        self.tracing = None  # a rung.serve.tracing.Tracing with --otlp-traces-endpoint
        if config.otlp_traces_endpoint:
            from rung.extras import require
            from rung.serve.tracing import Tracing

            require("otel", what="rung serve --otlp-traces-endpoint")
            self.tracing = Tracing(config.otlp_traces_endpoint, log_prompts=config.log_prompts)
        self.responses = ResponseStore(config.responses_store_size, config.responses_store_ttl,
                                       config.responses_store_bytes)

    # ---- loading ----------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model and start the engine (blocking; run it on a thread)."""
        engine = None
        try:
            from rung.engine.async_engine import AsyncEngine
            from rung.llm import LLM
            from rung.text.chat import chat_template_for

            c = self.config
            if c.redact:
                self.redactor = self.request_redactor(c.redact_entities)
            made: list[LLM] = []

            def build():  # on the engine's own thread: the only one to run the model (AsyncEngine's docstring)
                made.append(LLM(c.model, dtype=c.dtype, device=c.device, seed=c.seed, max_model_len=c.max_model_len,
                                tensor_parallel_size=c.tensor_parallel_size, **c.engine))
                return made[0].engine

            engine = AsyncEngine(build=build)
            llm = made[0]
            self.template = chat_template_for("gpt_oss" if llm.config.model_type == "gpt_oss" else llm.tokenizer)
            self.family = family_for(llm.config.model_type, self.template)
            try:
                from rung.serve.structured import Grammars

                self.grammars = Grammars(llm.tokenizer, llm.config.vocab_size)
                # imported now, not by the first constrained request's Constraint (seconds, on the event loop)
                import llguidance.torch  # noqa: F401
            except Exception as e:  # a tokenizer llguidance cannot read: no structured output, the rest works
                self.grammar_error = f"{type(e).__name__}: {e}"
            if c.verifier:
                from rung.govern.verify import load_verifier
                from rung.serve.governance import Verification

                self.verification = Verification(load_verifier(c.verifier, device=c.device), c.verify_threshold,
                                                 c.verify_action)
            self.engine = engine
            self.llm = llm
        except BaseException as e:
            self.load_error = e
            if engine is not None and self.engine is None:  # built, then something after it failed
                engine.shutdown()
        finally:
            self.loaded.set()

    def request_redactor(self, entities: tuple[str, ...] | None):
        """A loaded Redactor for these entity types (built once; blocking: call it off the event loop)."""
        from rung.govern.redact import DEFAULT_ENTITIES, PIIUnavailable, RedactionError, Redactor

        key = tuple(entities or DEFAULT_ENTITIES)
        got = self._redactors.get(key)
        if got is None:
            try:
                got = self._redactors[key] = Redactor(entities=key).load()
            except (PIIUnavailable, RedactionError) as e:
                raise bad_request(str(e), "redact") from None
        return got

    def unload(self) -> None:
        """Stop the engine and drop the model (blocking; only when no request uses it)."""
        engine, llm = self.engine, self.llm
        self.engine = self.llm = self.grammars = self.verification = None
        if engine is not None:
            engine.shutdown()
        if llm is not None:
            llm.shutdown()  # tensor-parallel workers, if any

    def shutdown(self) -> None:
        """Idempotent: the app's lifespan and `rung serve` may both call it."""
        if getattr(self, "_shut", False):
            return
        self._shut = True
        self.unload()  # engine, tensor-parallel workers
        if self.tracing is not None:
            self.tracing.shutdown()  # the last spans go out
        self.gate.shutdown()

    @property
    def ready(self) -> bool:
        return self.llm is not None

    def memory_bytes(self) -> int:
        """What the loaded model holds: its weights and buffers (each storage once) and its KV cache."""
        seen, total = set(), 0
        for t in [*self.llm.model.parameters(), *self.llm.model.buffers()]:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total + self.llm.engine.pool.bytes

    # ---- checks -----------------------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.config.name:
            shown = name if len(name) <= 200 else name[:200] + "..."
            raise APIError(404, f"The model '{shown}' does not exist; this server serves '{self.config.name}'",
                           "model", "model_not_found")

    def check_ready(self) -> None:
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        if not self.ready:
            raise APIError(503, "the model is still loading; retry shortly", code="model_loading",
                           headers={"Retry-After": "5"})

    # A request holds a slot of the shared gate (--max-concurrent, all models) and counts in its
    # model's ``in_flight``: a model with requests in flight is never unloaded (models.py).

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @in_flight.setter
    def in_flight(self, value: int) -> None:  # this model's count and the gate's move together
        self.gate.in_flight += value - self._in_flight
        self._in_flight = value

    def acquire(self) -> None:
        """A slot among --max-concurrent, or 429 at once (clients back off and retry)."""
        self.gate.acquire()
        self._in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    def claim(self) -> None:
        """Count a request the gate already admitted (models.py) as this model's too."""
        self._in_flight += 1

    def unclaim(self) -> None:
        self._in_flight -= 1

    async def off_loop(self, work, *args):
        """``Gate.off_loop`` for this model: abandoned work keeps the model busy until it ends."""
        return await _shielded(self.gate.pool, work, args, self)

    # ---- requests → engine work -------------------------------------------------------------------

    def prepare_chat(self, req: ChatCompletionRequest, principal=None) -> Prepared:
        from rung.serve.governance import allowed_tools
        from rung.text.chat import ChatTemplateError, encode_chat

        family = self.family
        for i, m in enumerate(req.messages):
            if isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    if part.type != "text":
                        raise bad_request(f"content parts of type {part.type!r} are not supported (text only)",
                                          f"messages.{i}.content.{j}.type")
            if m.role == "tool" and m.content is None:
                raise bad_request("a tool message needs content", f"messages.{i}.content")
        if req.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        if sum(_shape(t["function"].get("parameters"))[1] for t in tools or []) > MAX_SCHEMA_NODES:
            raise bad_request(f"tools: their parameters hold more than {MAX_SCHEMA_NODES} objects and arrays in all",
                              "tools", "invalid_json_schema")
        for i, t in enumerate(tools or []):
            if "parameters" in t["function"]:
                _check_schema(t["function"]["parameters"], f"tools.{i}.function.parameters")
        choice = req.tool_choice
        if isinstance(choice, str) and choice != "none" and not tools and choice == "required":
            raise bad_request("tool_choice 'required' needs tools", "tool_choice")
        named = None
        if not isinstance(choice, str) and choice is not None:
            named = choice.function.name
            if not tools or named not in {t["function"]["name"] for t in tools}:
                raise bad_request(f"tool_choice names the function {named!r}, which is not among the tools",
                                  "tool_choice")
        if choice == "none":
            tools = None
        tools, removed = allowed_tools(principal, tools, choice)  # what this key may not use, the model never sees
        kwargs = family.template_kwargs(req.reasoning_effort, req.chat_template_kwargs or {})
        thinking = family.thinking(kwargs)
        sent = [_message(m) for m in req.messages]
        grounded, grounding = ground_chat(self, req, sent)  # --rag: the passages go into the system message
        messages = family.messages(grounded, tools)
        started = time.perf_counter()
        try:  # special tokens come from the template only: a user's "<|im_start|>" is text
            text, prompt_ids = encode_chat(self.llm.tokenizer, self.template, messages,
                                           add_generation_prompt=req.add_generation_prompt,
                                           tools=tools if family.name != "json" else None, **kwargs)
        except ChatTemplateError as e:
            raise bad_request(f"the chat template refused the messages: {e}", "messages") from None
        except ValueError as e:  # harmony's renderer: an unknown role, an unanswerable tool message
            raise bad_request(str(e), "messages") from None
        except Exception as e:  # the template met values it cannot handle (a TypeError in a filter, ...)
            param = "chat_template_kwargs" if req.chat_template_kwargs else "messages"
            raise bad_request(f"the chat template failed on this request: {type(e).__name__}: {e}", param) from None
        phases = [("template", started, time.perf_counter())]
        grammar = None
        self._check_grammars(tools and (choice == "required" or named), req.response_format)
        started = time.perf_counter()
        opened = text.rstrip().endswith("<think>")  # a thinking-only template opened the block itself
        if tools and (choice == "required" or named):
            chosen = [t for t in tools if named is None or t["function"]["name"] == named]
            grammar = self._compile(lambda: family.grammar_call(chosen, thinking, self.grammars.added, opened),
                                    "tool_choice")
        elif req.response_format is not None and req.response_format.type != "text":
            schema = self._schema(req.response_format)
            grammar = self._compile(lambda: family.grammar_answer(schema, thinking, self.grammars.added, opened),
                                    "response_format")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        if grammar is not None:
            phases.append(("grammar", started, time.perf_counter()))
        params = self._params(req, prompt_ids, max_tokens, param, grammar,
                              logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        return Prepared(prompt_ids, params, text, tools, thinking, removed, sent, grounding=grounding, phases=phases)

    def prepare_completion(self, req: CompletionRequest) -> list[Prepared]:
        started = time.perf_counter()
        if req.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")
        if req.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if req.best_of not in (None, req.n):
            raise bad_request("best_of is not supported (use n)", "best_of")
        if req.echo and req.logprobs is not None:
            raise bad_request("echo with logprobs (prompt logprobs) is not supported", "echo")
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts or len(prompts) > 64:
            raise bad_request("prompt must hold 1 to 64 prompts", "prompt")
        grammar = None
        self._check_grammars(False, req.response_format)
        if req.response_format is not None and req.response_format.type != "text":
            schema = self._schema(req.response_format)
            grammar = self._compile(lambda: Family("json", False).grammar_answer(schema, False), "response_format")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                # a raw prompt is the caller's whole text, template included: special tokens written in it
                # are parsed, as vLLM does (chat messages are not: see prepare_chat)
                ids, text = self.llm.tokenizer.encode(p, add_special_tokens=True), p
            else:
                vocab = self.llm.config.vocab_size
                if not p or not all(0 <= t < vocab for t in p):
                    raise bad_request(f"prompt token ids must be integers in [0, {vocab})", f"prompt.{i}")
                ids, text = list(p), None
            if not ids:
                raise bad_request("the prompt is empty", "prompt")
            out.append(Prepared(ids, self._params(req, ids, req.max_tokens, "max_tokens", grammar,
                                                  logprobs=req.logprobs), text))
        if out:  # one span for the prompts' tokenization (and the grammar, compiled first)
            out[0].phases.append(("template", started, time.perf_counter()))
        return out

    def _check_grammars(self, forced_call: bool, fmt) -> None:
        if self.grammars is None and (forced_call or (fmt is not None and fmt.type != "text")):
            param = "tool_choice" if forced_call else "response_format"
            raise bad_request(f"structured output is not available for this model ({self.grammar_error})", param)

    def _schema(self, fmt) -> dict:
        if fmt.type == "json_object":
            return {"type": "object"}
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise bad_request("response_format of type json_schema needs json_schema.schema",
                              "response_format.json_schema.schema")
        schema = fmt.json_schema.schema_
        _check_schema(schema, "response_format.json_schema.schema")
        return schema

    def _compile(self, build, param: str):
        try:
            return self.grammars.compile(build())
        except GrammarError as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else "no reason given"  # llguidance adds the grammar
            raise bad_request(f"{param}: the grammar engine cannot enforce this: {why}", param,
                              "invalid_json_schema" if param == "response_format" else None) from None

    def _params(self, req, prompt_ids: list[int], max_tokens: int | None, param: str, grammar, logprobs):
        from rung.engine.sampling_params import SamplingParams

        context = self.llm.max_model_len
        if len(prompt_ids) >= context:
            raise bad_request(f"the prompt has {len(prompt_ids)} tokens but the model's context is {context} tokens",
                              "messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                              "context_length_exceeded")
        room = context - len(prompt_ids)
        if max_tokens is not None:
            if max_tokens < 1:
                raise bad_request(f"{param} must be at least 1, got {max_tokens}", param)
            if max_tokens > room:
                raise bad_request(f"{param} is too large: {max_tokens} tokens after a prompt of {len(prompt_ids)} "
                                  f"exceed the model's context of {context} tokens (at most {room})", param,
                                  "context_length_exceeded")
        limit = self.config.max_tokens
        if limit is not None:
            if max_tokens is not None and max_tokens > limit:
                raise bad_request(f"{param} is too large: this server allows at most {limit}", param)
            max_tokens = min(max_tokens or limit, limit)
        pool = self.llm.engine.pool  # the engine's own check, made here so a stream is refused before it starts
        longest = len(prompt_ids) + min(max_tokens or room, room)
        if -(-longest // pool.block_size) > pool.num_blocks:
            raise bad_request(f"a prompt of {len(prompt_ids)} tokens and {longest - len(prompt_ids)} new tokens need "
                              f"more KV cache than this server has ({pool.num_blocks * pool.block_size} tokens); "
                              f"lower {param}", param)
        vocab = self.llm.config.vocab_size
        if any(not 0 <= t < vocab for t in req.stop_token_ids or []):
            raise bad_request(f"stop_token_ids must be in [0, {vocab})", "stop_token_ids")
        try:
            return SamplingParams(
                n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, min_p=req.min_p or 0.0,
                repetition_penalty=req.repetition_penalty or 1.0, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, max_tokens=max_tokens, min_tokens=req.min_tokens,
                stop=req.stop, stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos,
                include_stop_str_in_output=req.include_stop_str_in_output, seed=req.seed, logprobs=logprobs,
                skip_special_tokens=req.skip_special_tokens and self.family.skip_special_tokens,
                constraint=grammar)
        except ValueError as e:  # SamplingParamsError names the field
            raise bad_request(str(e).removeprefix("SamplingParams: "), getattr(e, "param", None)) from None

    # ---- one engine request -----------------------------------------------------------------------

    async def generate(self, prepared: Prepared, request_id: str):
        """The engine's deltas for one prepared request; RequestError becomes a 400."""
        from rung.engine.engine import RequestError

        stream = self.engine.generate(prepared.prompt_ids, prepared.params, request_id)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            return
        except RequestError as e:
            raise bad_request(str(e)) from None
        try:
            yield first
            async for d in stream:
                yield d
        finally:
            await stream.aclose()

    def engine_stats(self) -> dict:
        return self.engine.stats() if self.engine is not None else {}


def _check_schema(schema, param: str) -> None:
    """A 400 naming ``param`` unless ``schema`` is a valid JSON Schema within the bounds above."""
    depth, nodes = _shape(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise bad_request(f"{param} nests more than {MAX_SCHEMA_DEPTH} levels of objects and arrays",
                          param, "invalid_json_schema")
    if nodes > MAX_SCHEMA_NODES:
        raise bad_request(f"{param} is too large: more than {MAX_SCHEMA_NODES} objects and arrays",
                          param, "invalid_json_schema")
    try:
        check_json_schema(schema, param)
    except GrammarError as e:
        raise bad_request(str(e), param, "invalid_json_schema") from None


def _shape(value) -> tuple[int, int]:
    """(levels, count) of the objects and arrays in ``value``; the walk stops past either bound."""
    nodes = 0

    def depth(v, level: int) -> int:
        nonlocal nodes
        if not isinstance(v, (dict, list)) or level > MAX_SCHEMA_DEPTH or nodes > MAX_SCHEMA_NODES:
            return 0
        nodes += 1
        items = v.values() if isinstance(v, dict) else v
        return 1 + max((depth(x, level + 1) for x in items), default=0)

    return depth(value, 0), nodes


def _message(m) -> dict:
    """A validated message as the plain dict templates read."""
    d = m.model_dump(exclude_none=True)
    if isinstance(m.content, list):
        d["content"] = "".join(p.text or "" for p in m.content)
    if m.tool_calls:
        d["tool_calls"] = [{"id": c.id, "type": "function",
                            "function": {"name": c.function.name, "arguments": c.function.arguments}}
                           for c in m.tool_calls]
    if m.role == "assistant" and m.reasoning and not m.reasoning_content:
        d["reasoning_content"] = d.pop("reasoning")
    return d


async def wait_disconnect(request) -> None:
    """Returns when the client goes away (an http.disconnect on the request's receive channel)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0)
