"""Sampling parameters a client may send: an absurd one is a 400 naming the field, and the server
stays healthy and serving. A request that fails inside the engine fails alone, and /health keeps
answering 200 (the engine's health is its present state, not the memory of one bad request)."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from rung.serve.app import create_app
from rung.serve.server import ServeConfig, Server

ABSURD = [("repetition_penalty", "1e-38"), ("repetition_penalty", "Infinity"), ("repetition_penalty", "NaN"),
          ("repetition_penalty", "1e6"), ("min_tokens", "1000000000")]  # min_tokens above max_tokens


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from oracle import tiny_chat_model

    folder = tiny_chat_model(tmp_path_factory.mktemp("bounds"), max_position_embeddings=128)
    server = Server(ServeConfig(model=str(folder), served_model_name="tiny", engine=dict(num_blocks=64)))
    server.load()
    assert server.load_error is None, server.load_error
    with TestClient(create_app(server), raise_server_exceptions=False) as client:  # a 500 is a response here
        yield client, server
    server.engine.shutdown()


def chat(client, **fields):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **fields}
    return client.post("/v1/chat/completions", json=body)


def raw_chat(client, field: str, value: str):
    """A body with ``value`` written as is: Python's json reads NaN and Infinity, which JSON lacks."""
    body = '{"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "%s": %s}'
    return client.post("/v1/chat/completions", content=body % (field, value),
                       headers={"Content-Type": "application/json"})


def healthy_and_serving(client) -> None:
    assert client.get("/health").status_code == 200
    reply = chat(client, temperature=0)
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_tiny_repetition_penalty_is_a_400_naming_it_and_the_server_stays_healthy(client):
    client, _ = client
    reply = chat(client, repetition_penalty=1e-38, temperature=0.7)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "repetition_penalty"
    assert "repetition_penalty" in error["message"]
    healthy_and_serving(client)


@pytest.mark.parametrize("field, value", ABSURD)
def test_absurd_sampling_fields_are_400s_naming_the_field(client, field, value):
    client, _ = client
    reply = raw_chat(client, field, value)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field and field in error["message"]
    healthy_and_serving(client)


def test_a_request_that_fails_in_the_engine_is_a_500_for_it_alone_and_health_stays_200(client, monkeypatch):
    client, server = client
    engine = server.engine.engine
    sample = engine._sample

    def poisoned(seq, row):  # the model's logits for this request are NaN: the sampler has nothing to draw
        return sample(seq, row * float("nan") if seq.params.temperature == 0.5 else row)

    monkeypatch.setattr(engine, "_sample", poisoned)
    reply = chat(client, temperature=0.5)
    assert reply.status_code == 500 and "every logit is -inf or NaN" in reply.json()["error"]["message"]
    healthy_and_serving(client)
    assert json.loads(client.get("/health").text)["status"] == "ok"
    stats = server.engine.stats()
    assert stats["running"] == stats["waiting"] == 0 and stats["free_blocks"] == 64 * len(engine.pool.groups)
