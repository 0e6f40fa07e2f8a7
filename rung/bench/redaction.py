"""A candidate run redacted: the suite's messages go through rung's PII redaction before the model
sees them, and its answers (text and tool-call arguments) are restored before they are scored.

``smollm2-135m+redact`` (or ``rung bench --redact``, which adds that twin of every candidate) is a
candidate of its own: its own name in the report, beside the unredacted one, and its own cache key
(the redaction settings are part of the fingerprint). The time redaction takes is part of each
request's time to first token and latency, as it would be in front of a server.
"""

from __future__ import annotations

import dataclasses
import time

SUFFIX = "+redact"


def is_redacted(spec: str) -> bool:
    return spec.endswith(SUFFIX)


def base_spec(spec: str) -> str:
    return spec[:-len(SUFFIX)] if is_redacted(spec) else spec


class RedactedCandidate:
    """Wraps any candidate (local, worker, endpoint) with a Redactor; one PIIVault per request."""

    def __init__(self, inner, redactor=None):
        from rung.govern.redact import Redactor

        self.inner = inner
        self.redactor = redactor or Redactor()
        self.name = inner.name + SUFFIX
        self.kind = getattr(inner, "kind", "local")
        self.entities = 0  # redacted so far (all requests)

    def fingerprint(self) -> dict:
        return {**self.inner.fingerprint(), "redact": self.redactor.key()}

    @property
    def info(self):
        info = self.inner.info
        if info is None:
            return None
        return dataclasses.replace(info, name=self.name, redaction=",".join(self.redactor.entities))

    def open(self):
        self.redactor.load()  # a missing extra fails the candidate in one line, before the model loads
        self.inner.open()
        return self.info

    def generate(self, requests, concurrency: int, on_done=None) -> float:
        start = time.perf_counter()
        redacted, vaults, costs = [], [], []
        for req in requests:
            t = time.perf_counter()
            r = self.redactor.redact_messages(req.messages)
            costs.append(time.perf_counter() - t)
            self.entities += len(r.entities)
            redacted.append(dataclasses.replace(req, messages=r.messages))
            vaults.append(r.vault)
        overhead = time.perf_counter() - start

        def done(index: int, samples) -> None:
            vault, cost = vaults[index], costs[index]
            for s in samples:
                s.text = vault.restore(s.text)
                if s.tool_calls:
                    s.tool_calls = vault.restore_data(s.tool_calls)
                if s.error:
                    s.error = vault.restore(s.error)
                if s.ttft_s is not None:
                    s.ttft_s += cost
                if s.latency_s is not None:
                    s.latency_s += cost
            if on_done:
                on_done(index, samples)

        return overhead + self.inner.generate(redacted, concurrency, done)

    def perplexity(self, text: str):
        return self.inner.perplexity(self.redactor.redact_text(text).text)

    def measure_memory(self) -> None:
        self.inner.measure_memory()

    def close(self) -> None:
        self.inner.close()
