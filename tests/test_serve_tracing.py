"""OpenTelemetry traces of served requests (--otlp-traces-endpoint): one trace per request, its
phases as child spans in order, GenAI attributes, and no prompt text unless --log-prompts."""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from rung.serve.app import create_app  # noqa: E402
from rung.serve.server import ServeConfig, Server  # noqa: E402
from rung.serve.tracing import Tracing  # noqa: E402

SECRET = "my secret prompt about zebras"


def serve(folder, log_prompts: bool = False):
    server = Server(ServeConfig(model=str(folder), served_model_name="tiny", engine=dict(num_blocks=64),
                                log_prompts=log_prompts))
    server.load()
    assert server.load_error is None, server.load_error
    exporter = InMemorySpanExporter()
    server.tracing = Tracing(exporter=exporter, log_prompts=log_prompts)
    return server, exporter


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from oracle import tiny_chat_model

    return tiny_chat_model(tmp_path_factory.mktemp("trace"), max_position_embeddings=128)


def spans_by_trace(exporter) -> dict:
    out = {}
    for span in exporter.get_finished_spans():
        out.setdefault(span.context.trace_id, []).append(span)
    return out


def test_a_chat_request_is_one_trace_with_its_phases_in_order_and_genai_attributes(folder):
    server, exporter = serve(folder)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    with TestClient(create_app(server)) as client:
        r = client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": SECRET}], "max_tokens": 5, "temperature": 0,
            "seed": 3, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
        assert r.status_code == 200
    server.engine.shutdown()
    [spans] = spans_by_trace(exporter).values()
    root = next(s for s in spans if s.parent is None)
    children = sorted((s for s in spans if s.parent is not None), key=lambda s: s.start_time)
    assert root.name == "chat tiny"
    assert [s.name for s in children] == ["admission", "template", "grammar", "queue", "prefill", "decode"]
    assert all(s.parent.span_id == root.context.span_id for s in children)
    for a, b in zip(children, children[1:]):  # in order, and within the request
        assert a.start_time <= b.start_time and a.end_time <= b.end_time
    assert root.start_time <= children[0].start_time and children[-1].end_time <= root.end_time
    body = r.json()
    attrs = dict(root.attributes)
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.system"] == "rung"
    assert attrs["gen_ai.request.model"] == "tiny" and attrs["gen_ai.response.id"] == body["id"]
    assert attrs["gen_ai.usage.input_tokens"] == body["usage"]["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"]
    assert list(attrs["gen_ai.response.finish_reasons"]) == [body["choices"][0]["finish_reason"]]
    assert attrs["gen_ai.request.max_tokens"] == 5 and attrs["gen_ai.request.temperature"] == 0
    assert attrs["gen_ai.request.seed"] == 3 and attrs["http.response.status_code"] == 200
    # no prompt text anywhere by default
    assert not any(SECRET in str(v) for s in spans for v in dict(s.attributes).values())


def test_prompt_text_only_with_log_prompts_and_a_streamed_request_has_a_stream_span(folder):
    server, exporter = serve(folder, log_prompts=True)
    with TestClient(create_app(server)) as client:
        with client.stream("POST", "/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": SECRET}], "max_tokens": 4,
                "stream": True}) as r:
            assert r.status_code == 200 and "[DONE]" in "".join(r.iter_text())
    server.engine.shutdown()
    [spans] = spans_by_trace(exporter).values()
    root = next(s for s in spans if s.parent is None)
    assert SECRET in root.attributes["gen_ai.prompt"]
    names = [s.name for s in sorted(spans, key=lambda s: s.start_time) if s.parent is not None]
    assert names[:3] == ["admission", "template", "queue"] and "stream" in names and "decode" in names
    assert root.attributes["rung.stream"] is True


def test_a_refused_request_is_a_trace_with_its_status(folder):
    server, exporter = serve(folder)
    with TestClient(create_app(server)) as client:
        r = client.post("/v1/chat/completions", json={"model": "other", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404
    server.engine.shutdown()
    [spans] = spans_by_trace(exporter).values()
    [root] = spans
    assert root.attributes["http.response.status_code"] == 404 and root.status.status_code.name == "ERROR"


def test_the_flag_without_the_extra_is_one_line(monkeypatch, capsys):
    import rung.extras

    real = rung.extras.installed
    monkeypatch.setattr(rung.extras, "installed", lambda m: False if m.startswith("opentelemetry") else real(m))
    from rung.cli import main

    assert main(["serve", "--otlp-traces-endpoint", "http://localhost:4318"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("needs the otel extra (opentelemetry.sdk is not installed): pip install 'rung[otel]'")


def test_rung_serve_exports_over_otlp_http_and_flushes_on_sigterm(folder, tmp_path):
    """The flag end to end: a localhost sink stands in for the collector; the trace of a request
    answered just before SIGTERM still arrives (uvicorn re-raises the signal after its shutdown,
    so the flush happens in the app's lifespan)."""
    import http.server
    import json
    import threading
    import urllib.request

    from serve_helpers import free_port, rung_serve

    posts = []

    class Sink(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            posts.append((self.path, self.headers.get("content-type"), self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    sink = http.server.HTTPServer(("127.0.0.1", free_port()), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    try:
        with rung_serve(["-m", str(folder), "--otlp-traces-endpoint", f"http://127.0.0.1:{sink.server_port}"],
                        tmp_path / "serve.log", "rung serve with traces") as (port, proc):
            body = json.dumps({"model": str(folder), "messages": [{"role": "user", "content": SECRET}],
                               "max_tokens": 3}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            assert urllib.request.urlopen(req, timeout=60).status == 200
        # rung_serve terminated it (SIGTERM) right after the answer
    finally:
        sink.shutdown()
    assert [(p, t) for p, t, _ in posts] == [("/v1/traces", "application/x-protobuf")]
    assert b"admission" in posts[0][2] and b"decode" in posts[0][2] and SECRET.encode() not in posts[0][2]


def test_a_responses_request_is_traced_as_a_chat(folder):
    server, exporter = serve(folder)
    with TestClient(create_app(server)) as client:
        r = client.post("/v1/responses", json={"model": "tiny", "input": SECRET, "max_output_tokens": 4})
        assert r.status_code == 200, r.text
    server.engine.shutdown()
    [spans] = spans_by_trace(exporter).values()
    root = next(s for s in spans if s.parent is None)
    names = [s.name for s in sorted(spans, key=lambda s: s.start_time) if s.parent is not None]
    assert root.name == "chat tiny" and names == ["admission", "template", "queue", "prefill", "decode"]
    assert root.attributes["gen_ai.usage.output_tokens"] == r.json()["usage"]["output_tokens"]
    assert not any(SECRET in str(v) for s in spans for v in dict(s.attributes).values())
