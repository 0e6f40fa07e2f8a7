"""One JSON line per request on the ``rung.serve.requests`` logger (stderr by default): what an
operator needs to trace a request and nothing a user typed, unless the server runs with
--log-prompts."""

from __future__ import annotations

import json
import logging
import sys
import time

logger = logging.getLogger("rung.serve.requests")


def setup(stream=None) -> None:
    """Lines go to ``stream`` (stderr) as they are, without logging's own prefix."""
    if logger.handlers:
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def request_line(**fields) -> None:
    """``fields``: id, endpoint, model, status, prompt_tokens, completion_tokens, latency_s, ttft_s,
    tool_calls, finish_reasons, ... (None values are left out)."""
    line = {"ts": round(time.time(), 3), "event": "request", **{k: v for k, v in fields.items() if v is not None}}
    logger.info(json.dumps(line, ensure_ascii=False, default=str))


def event_line(event: str, **fields) -> None:
    """Another kind of line on the same logger (``policy_denied``, ...); None values are left out."""
    line = {"ts": round(time.time(), 3), "event": event, **{k: v for k, v in fields.items() if v is not None}}
    logger.info(json.dumps(line, ensure_ascii=False, default=str))
