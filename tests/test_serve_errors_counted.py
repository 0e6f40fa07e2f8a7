"""An unexpected exception in a route is answered with a 500 by the outermost handler, outside the
metrics middleware: it must still be counted in rung:http_requests_total, which the 5xx alert
(ops/alerts.yml's RungHigh5xxRate) and the dashboard read."""

from __future__ import annotations

from starlette.testclient import TestClient

from govern_fakes import served, tiny_qwen3
from rung.serve.app import create_app
from serve_helpers import metric


def test_an_unexpected_error_is_answered_and_counted_as_a_500(tmp_path):
    _, server = served(tiny_qwen3(tmp_path))
    try:
        client = TestClient(create_app(server), raise_server_exceptions=False)

        def broken(*args):
            raise RuntimeError("boom")

        server.prepare_chat = broken
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 500 and "boom" in r.text
        text = client.get("/metrics").text
        assert metric(text, "rung:http_requests_total", handler="/v1/chat/completions", status="500") == 1
        assert client.get("/health").status_code == 200  # the server goes on
    finally:
        server.shutdown()
