"""The conformance suite's rows: a FormatConformance class's tests take ``case`` (every row of its
format) or ``forced_case`` (the rows also run with tool_choice "required")."""

from __future__ import annotations

import pytest

from cases import CASES
from runners import scripted_server


@pytest.fixture(scope="class")
def chat(request):
    """(TestClient, ScriptedEngine) of the class's format, one server for all its rows."""
    client, engine = scripted_server(request.cls.FORMAT)
    with client:
        yield client, engine


def pytest_generate_tests(metafunc):
    fmt = getattr(metafunc.cls, "FORMAT", None)
    if fmt is None:
        return
    rows = CASES[fmt]
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", rows, ids=[c.id for c in rows])
    if "forced_case" in metafunc.fixturenames:
        forced = [c for c in rows if c.forced]
        metafunc.parametrize("forced_case", forced, ids=[c.id for c in forced])
