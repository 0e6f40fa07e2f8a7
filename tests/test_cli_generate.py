"""`rung generate` and `rung chat` end to end on a tiny model folder."""

from __future__ import annotations

import io

import pytest

from rung.cli import main

from oracle import tiny_chat_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tiny_chat_model(tmp_path_factory.mktemp("cli-model")))


def test_generate_streams_the_completion_and_reports_speed(folder, capsys):
    assert main(["generate", "-m", folder, "Hello world", "--max-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert out and "6 tokens" in err and "tokens/s" in err and "loaded" in err


def test_chat_keeps_history_and_understands_commands(folder, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/system Be brief.\nAgain\n/reset\n/nope\n/exit\nnever read\n"))
    assert main(["chat", "-m", folder, "--max-tokens", "4"]) == 0
    _, err = capsys.readouterr()
    assert err.count("tokens/s") == 2  # two answers, then /exit stopped the loop
    assert "system prompt set" in err and "conversation cleared" in err and "unknown command /nope" in err


def test_unknown_model_is_a_one_line_error(capsys):
    assert main(["generate", "-m", "no-such-model", "hi"]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("rung: error:") and err.count("\n") == 1
