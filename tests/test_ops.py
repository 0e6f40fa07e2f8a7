"""ops/: the Grafana dashboard queries only metrics a running server exports, the alert rules are
valid (promtool check rules) and fire when they should (promtool test rules), and every alert has
its playbook in docs/operations.md."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from starlette.testclient import TestClient

from rung.serve.app import create_app
from rung.serve.server import ServeConfig, Server

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "ops" / "grafana" / "rung.json"
ALERTS = ROOT / "ops" / "alerts.yml"
METRIC = re.compile(r"\b(rung:[a-zA-Z0-9_:]+)")
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def family(name: str) -> str:
    """rung:x_total → rung:x (exposition family names carry no sample suffix)."""
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """The metric families /metrics of a running server declares, after one request."""
    from oracle import tiny_chat_model

    folder = tiny_chat_model(tmp_path_factory.mktemp("ops"), max_position_embeddings=128)
    server = Server(ServeConfig(model=str(folder), served_model_name="tiny", engine=dict(num_blocks=64)))
    server.load()
    assert server.load_error is None, server.load_error
    with TestClient(create_app(server)) as client:
        r = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 3,
                                                      "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200
        text = client.get("/metrics").text
    server.engine.shutdown()
    return {family(name) for name in re.findall(r"^# TYPE (\S+) ", text, re.M)}


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs


def test_the_dashboard_parses_and_queries_only_metrics_the_server_exports(exported):
    exprs = dashboard_queries()
    assert len(exprs) >= 20
    queried = {family(m) for e in exprs for m in METRIC.findall(e)}
    assert queried - exported == set()
    # the panels: traffic, latency percentiles, queue, KV, prefix cache, errors, governance
    for needed in ("rung:request_success", "rung:generation_tokens", "rung:time_to_first_token_seconds",
                   "rung:time_per_output_token_seconds", "rung:num_requests_waiting", "rung:kv_cache_usage_perc",
                   "rung:prefix_cache_hit_rate", "rung:http_requests", "rung:policy_denied_calls",
                   "rung:policy_refusals", "rung:verifier_verdicts", "rung:redacted_entities"):
        assert needed in queried, needed
    assert all('model_name=~"$model_name"' in e for e in exprs if "rung:" in e and "label_values" not in e)


def test_every_alert_has_a_for_a_threshold_known_metrics_and_a_playbook(exported):
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert names == {"RungDown", "RungHigh5xxRate", "RungSlowFirstToken", "RungKVCacheFull", "RungThrottling",
                     "RungVerifierRefusalsJump", "RungPolicyDenialsJump", "RungStuck"}
    playbooks = (ROOT / "docs" / "operations.md").read_text()
    for r in rules:
        assert r["for"] and re.search(r"[<>]|==", r["expr"]), r["alert"]
        assert {family(m) for m in METRIC.findall(r["expr"])} <= exported, r["alert"]
        anchor = r["annotations"]["runbook_url"].split("#")[1]
        assert anchor == r["alert"].lower() and f"### {r['alert']}\n" in playbooks


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; .ci/run fetches it)")
    return found


def test_promtool_accepts_the_rules():
    out = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 8 rules found" in out.stdout


def test_the_alerts_fire_on_their_unit_test_series():
    out = subprocess.run([promtool(), "test", "rules", str(ALERTS.parent / "alerts_test.yml")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
