"""OpenTelemetry traces of served requests (``rung serve --otlp-traces-endpoint URL``, vLLM's flag).

One trace per request: a root span named as OpenTelemetry's GenAI conventions name an inference
span (``chat MODEL``, ``text_completion MODEL``), and a child span per phase, in order:

    admission   the body read and parsed, the request admitted (or refused: 429)
    redaction   PII replaced by placeholders (--redact)
    template    the chat template rendered and the prompt tokenized
    grammar     the structured-output or forced-tool-call grammar compiled
    queue       waiting in the engine for its first step          (engine timestamps)
    prefill     its first step to its first token                 (engine timestamps)
    decode      its first token to its last                       (engine timestamps)
    tool_policy a round after the policy denied a call (one span per round)
    verify      the verifier scoring the answer (--verifier)
    stream      the first streamed chunk to the last

Each phase is timed where it happens (a ``Trace`` is a list of (name, start, end, attributes) in
time.perf_counter seconds), and the spans are built when the request ends, with those times. So
nothing outside this module imports OpenTelemetry, the engine thread and the prepare threads need
no tracing context, and a server without the flag pays for a few clock reads only.

Attributes: ``gen_ai.operation.name``, ``gen_ai.system`` ("rung"), ``gen_ai.request.model``,
``gen_ai.response.model``, ``gen_ai.request.max_tokens`` / ``temperature`` / ``top_p`` / ``seed``,
``gen_ai.usage.input_tokens`` / ``output_tokens``, ``gen_ai.response.finish_reasons``,
``gen_ai.response.id``, ``http.response.status_code`` and ``error.type`` when it failed. The
prompt's text only with --log-prompts (``gen_ai.prompt``). The SDK and the OTLP exporter are the
``otel`` extra.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

SPAN_ORDER = ("admission", "redaction", "template", "grammar", "queue", "prefill", "decode", "tool_policy",
              "verify", "stream")


@dataclass
class Trace:
    """One request's phases, as they happen (perf_counter seconds)."""

    start: float = field(default_factory=time.perf_counter)
    phases: list[tuple[str, float, float, dict]] = field(default_factory=list)
    exported: bool = False

    def add(self, name: str, start: float, end: float | None = None, **attributes) -> None:
        if start is not None:
            self.phases.append((name, start, time.perf_counter() if end is None else end, attributes))

    def timed(self, name: str, **attributes) -> "_Phase":
        """``with trace.timed("redaction"): ...``"""
        return _Phase(self, name, attributes)

    def engine(self, timings: dict | None) -> None:
        """queue / prefill / decode from an engine sequence's timestamps (Delta.timings)."""
        if not timings:
            return
        arrival, scheduled = timings.get("arrival_time"), timings.get("first_scheduled_time")
        first, finished = timings.get("first_token_time"), timings.get("finished_time")
        if arrival is not None and scheduled is not None:
            self.add("queue", arrival, scheduled)
        if scheduled is not None and first is not None:
            self.add("prefill", scheduled, first)
        if first is not None and finished is not None:
            self.add("decode", first, finished)


class _Phase:
    def __init__(self, trace: Trace, name: str, attributes: dict):
        self.trace, self.name, self.attributes = trace, name, attributes

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.trace.add(self.name, self.start, **self.attributes)
        return False


class Tracing:
    """The server's exporter: ``export(trace, ...)`` turns a finished request's Trace into spans.
    ``exporter``: an OpenTelemetry SpanExporter (tests pass the SDK's InMemorySpanExporter);
    otherwise OTLP over HTTP to ``endpoint``."""

    def __init__(self, endpoint: str | None = None, exporter=None, log_prompts: bool = False,
                 service_name: str = "rung"):
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        self.log_prompts = log_prompts
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=_traces_url(endpoint))))
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("rung.serve")
        # perf_counter → epoch nanoseconds, fixed once (spans are built after the fact)
        self._epoch_ns = time.time_ns() - time.perf_counter_ns()

    def _ns(self, t: float) -> int:
        return self._epoch_ns + int(t * 1e9)

    def export(self, trace: Trace, operation: str, model: str, attributes: dict, end: float | None = None,
               prompt: str | list | None = None, error: str | None = None) -> None:
        from opentelemetry import trace as otel
        from opentelemetry.trace import Status, StatusCode

        end = time.perf_counter() if end is None else end
        trace.exported = True
        attrs = {"gen_ai.operation.name": operation, "gen_ai.system": "rung", "gen_ai.request.model": model,
                 **{k: v for k, v in attributes.items() if v is not None}}
        if self.log_prompts and prompt is not None:
            attrs["gen_ai.prompt"] = prompt if isinstance(prompt, str) else "\n".join(map(str, prompt))
        root = self.tracer.start_span(f"{operation} {model}", start_time=self._ns(trace.start),
                                      kind=otel.SpanKind.SERVER, attributes=attrs)
        if error is not None:
            root.set_status(Status(StatusCode.ERROR, error))
        context = otel.set_span_in_context(root)
        for name, start, stop, phase_attrs in sorted(trace.phases, key=lambda p: (p[1], SPAN_ORDER.index(p[0])
                                                                                  if p[0] in SPAN_ORDER else 99)):
            span = self.tracer.start_span(name, context=context, start_time=self._ns(start), attributes=phase_attrs)
            span.end(end_time=self._ns(max(stop, start)))
        root.end(end_time=self._ns(end))

    def flush(self, timeout_ms: int = 5000) -> None:
        self.provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes the batch


def _traces_url(endpoint: str | None) -> str | None:
    """vLLM takes the collector's base URL (host:4318 over HTTP) or the full /v1/traces path."""
    if endpoint and not endpoint.rstrip("/").endswith("/v1/traces"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint
