"""Helpers of the `rung serve` tests: a free localhost port, polling, a real server in a subprocess, reading /metrics."""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def metric(text: str, name: str, **labels) -> float:
    """The sum of the samples of ``name`` (exact name) whose labels include ``labels``; 0 if none."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([^{\s]+)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
            found = True
    return total if found else 0.0


@contextlib.contextmanager
def rung_serve(args: list[str], log_path, what: str, timeout: float = 300, cwd=None):
    """``rung serve ARGS`` in a subprocess on a free localhost port, its output in ``log_path``;
    yields (port, process) once /health answers 200, and stops it afterwards. A server that exits
    while loading fails the wait with the end of its log."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rung", "serve", "--port", str(port), *args], stdout=log,
                                stderr=subprocess.STDOUT, cwd=cwd)

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"rung serve exited {proc.returncode}: {Path(log_path).read_text()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                return conn.getresponse().status == 200
            except OSError:
                return False

        try:
            wait_until(healthy, timeout, what)
            yield port, proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
