"""One local candidate in its own process, so its peak memory is its own.

Models measured one after another in one process would share an allocator that seldom gives memory
back, and the second model's peak would include the first's leftovers. ``WorkerCandidate`` has the
interface of ``LocalCandidate`` and forwards each call as one JSON line to ``python -m
rung.bench.worker``; replies are JSON lines too (never pickles).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict

from rung.bench.candidates import LocalCandidate, OnDone, Request
from rung.bench.records import CandidateInfo, Sample


class WorkerError(RuntimeError):
    """The worker process failed; the message carries its last error line."""


class WorkerCandidate:
    kind = "local"

    def __init__(self, spec: str, progress=None, **options):
        self.name, self.options, self.progress = spec, options, progress
        self._local = LocalCandidate(spec, **options)  # for the fingerprint, computed here
        self.proc = None
        self.info: CandidateInfo | None = None

    def fingerprint(self) -> dict:
        return self._local.fingerprint()

    def open(self) -> CandidateInfo:
        self._stderr = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "rung.bench.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, encoding="utf-8", env=env)
        self.info = CandidateInfo.from_dict(self._call({"op": "open", "spec": self.name, "options": self.options}))
        return self.info

    def generate(self, requests: list[Request], concurrency: int, on_done: OnDone | None = None) -> float:
        def event(reply):
            if on_done:
                on_done(reply["index"], [Sample(**s) for s in reply["samples"]])

        return self._call({"op": "generate", "requests": [asdict(r) for r in requests], "concurrency": concurrency},
                          on_event=event)

    def perplexity(self, text: str) -> tuple[float | None, str]:
        value, why = self._call({"op": "perplexity", "text": text})
        return value, why

    def measure_memory(self) -> None:
        self.info = CandidateInfo.from_dict(self._call({"op": "memory"}))

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.write(json.dumps({"op": "close"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self._stderr.close()

    def _call(self, message: dict, on_event=None):
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except OSError:
            raise WorkerError(self._died()) from None
        for line in self.proc.stdout:
            reply = json.loads(line)
            if "progress" in reply:
                if self.progress:
                    self.progress(*reply["progress"])
            elif "index" in reply:
                on_event(reply)
            elif "error" in reply:
                raise WorkerError(reply["error"])
            else:
                return reply["ok"]
        raise WorkerError(self._died())

    def _died(self) -> str:
        code = self.proc.wait()
        self._stderr.seek(0)
        lines = [ln for ln in self._stderr.read().splitlines() if ln.strip()]
        return f"{self.name}: the worker process exited ({code}): {lines[-1] if lines else 'no output'}"


def _serve() -> None:
    """The worker's loop: one JSON command per line on stdin, JSON replies on the original stdout."""
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # anything else printed goes to stderr, never into the replies

    def send(obj) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    candidate = None
    for line in sys.stdin:
        message = json.loads(line)
        op = message["op"]
        try:
            if op == "open":
                candidate = LocalCandidate(message["spec"], progress=lambda done, total: send({"progress": [done, total]}),
                                           **message["options"])
                send({"ok": asdict(candidate.open())})
            elif op == "generate":
                requests = [Request(**r) for r in message["requests"]]
                wall = candidate.generate(requests, message["concurrency"],
                                          lambda i, samples: send({"index": i, "samples": [asdict(s) for s in samples]}))
                send({"ok": wall})
            elif op == "perplexity":
                send({"ok": list(candidate.perplexity(message["text"]))})
            elif op == "memory":
                candidate.measure_memory()
                send({"ok": asdict(candidate.info)})
            elif op == "close":
                return
        except Exception as e:  # reported to the parent as one line; the worker keeps serving
            send({"error": f"{message.get('spec', candidate.name if candidate else '')}: {' '.join(str(e).split())}"})


if __name__ == "__main__":
    _serve()
