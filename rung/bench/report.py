"""What a bench run prints and writes: the terminal table, a self-contained HTML report with plots,
and a JSON file of every figure.

``build_report`` gathers everything into one plain dict (the JSON file is exactly that dict); the
terminal and HTML views only format it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from html import escape
from pathlib import Path
from typing import Any

import rung
from rung.bench.decide import Decision, Requirements
from rung.bench.measure import Metrics
from rung.bench.plots import Point, distributions, scatter
from rung.bench.records import CandidateRun
from rung.bench.suite import Suite


def machine() -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def build_report(suite: Suite, runs: list[CandidateRun], metrics: list[Metrics], decision: Decision,
                 requirements: Requirements, settings: dict[str, Any], wall_s: float | None = None,
                 deploy: dict | None = None) -> dict[str, Any]:
    """Everything, as JSON-ready data. ``candidates[].verdict.verdict`` is "reliable" | "provisional" |
    "fails"; ``decision.status`` is "reliable" | "provisional" | "none"; ``decision.comparisons`` pairs
    each candidate with the next smaller one; ``deploy`` (last) holds the serve command and `chosen:` line."""
    by_name = {r.info.name: r for r in runs}
    candidates = []
    for m in metrics:
        v = decision.verdict(m.name)
        status = "error" if m.error else "chosen" if m.name == decision.chosen else "pass" if v.passed else "fail"
        candidates.append({"metrics": m.to_dict(), "info": by_name[m.name].to_dict()["info"], "status": status,
                           "verdict": {"verdict": v.verdict, "passed": v.passed, "reasons": v.reasons,
                                       "within_noise": v.within_noise, "notes": v.notes,
                                       "memory_needed_bytes": v.memory_needed_bytes}})
    order = {v.name: i for i, v in enumerate(decision.verdicts)}
    candidates.sort(key=lambda c: order[c["metrics"]["name"]])
    cases = []
    for case in suite.cases:
        row = {"id": case.id, "tags": case.tags, "checks": [c.to_dict() for c in case.checks],
               "input": case.text if not case.generates else case.chat_messages(), "outcomes": {}}
        for r in runs:
            outcome = next((o for o in r.cases if o.case_id == case.id), None)
            if outcome is not None:
                row["outcomes"][r.info.name] = outcome.to_dict()
                if len(outcome.runs) > 1:
                    row.setdefault("repeats", {})[r.info.name] = _repeats(outcome)
        cases.append(row)
    return {
        "rung": rung.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "wall_s": wall_s,
        "suite": {"name": suite.name, "version": suite.version, "hash": suite.hash, "source": suite.source,
                  "description": suite.description, "cases": len(suite.cases)},
        "settings": settings,
        "requirements": requirements.to_dict(),
        "decision": {"chosen": decision.chosen, "status": decision.status, "summary": decision.summary,
                     "notes": decision.notes, "confidence": decision.confidence, "comparisons": decision.comparisons,
                     "against_best": decision.against_best, "cases_to_decide": decision.cases_to_decide},
        "candidates": candidates,
        "cases": cases,
        "deploy": deploy,
    }


def _repeats(outcome) -> dict[str, Any]:
    """A case's runs: how many passed, pass@k (any), pass^k (all), flaky (some but not all)."""
    k, passed = len(outcome.runs), sum(r.passed for r in outcome.runs)
    return {"runs": k, "passed": passed, "pass_at_k": float(passed > 0), "pass_hat_k": float(passed == k),
            "flaky": 0 < passed < k}


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str), encoding="utf-8")


# ---- formatting helpers ------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.0%}"


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _num(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:,.0f} MB"


def _params(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:,.0f}M"


def _cost(x: float | None) -> str:
    return "—" if x is None else f"${x:.4f}" if x < 1 else f"${x:,.2f}"


def _latency(m: dict[str, Any], key: str, label: str | None = None) -> str:
    """A p95 in ms, or '812 (max, n=18)' when too few requests make it their maximum (unless the
    column's ``label`` already says so)."""
    value = _ms(m[key])
    own = m.get("latency_label", "p95")
    return value if own in ("p95", label) or m[key] is None else f"{value} ({own.replace(' (', ', ').rstrip(')')})"


def latency_label(cands: list[dict]) -> str:
    """The p95 columns' label: 'p95', or 'max (n=18)' when every candidate's is that."""
    labels = {c["metrics"].get("latency_label", "p95") for c in cands if not c["metrics"]["error"]}
    return labels.pop() if len(labels) == 1 else "p95"


def _interval(ci, fmt=lambda x: f"{x * 100:.0f}") -> str:
    return "" if not ci else f"{fmt(ci[0])}–{fmt(ci[1])}"


def _signed_pct(x: float) -> str:
    return f"{x * 100:+.0f} pts" if abs(x) >= 0.005 else "0 pts"


def comparison_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    """The pairwise comparisons, formatted: one row per candidate and the next smaller one."""
    rows = []
    for c in report["decision"].get("comparisons") or []:
        ci = c["difference_ci"]
        e2e = c.get("e2e_ms") or {}
        rows.append({
            "pair": f"{c['smaller']} → {c['larger']}", "cases": str(c["cases"]),
            "differ": f"{c['differ']} ({c['smaller_only']} / {c['larger_only']})",
            "difference": _signed_pct(c["difference"]) + (f" [{ci[0] * 100:+.0f}, {ci[1] * 100:+.0f}]" if ci else ""),
            "p": f"{c['p_value']:.2g}" + (" *" if c["significant"] else ""),
            "e2e": (f"{e2e['mean_difference']:+,.0f} [{e2e['ci'][0]:+,.0f}, {e2e['ci'][1]:+,.0f}]"
                    if e2e and e2e.get("ci") else "—")})
    return rows


COMPARISON_HEAD = ["smaller → larger", "cases", "differ (only smaller / only larger)", "pass-rate difference [CI]",
                   "McNemar p", "e2e latency Δ ms [CI]"]


def check_types(report: dict[str, Any]) -> list[str]:
    return sorted({t for c in report["candidates"] for t in c["metrics"]["by_check"]})


def _verdict_text(c: dict[str, Any]) -> str:
    if c["status"] == "chosen":
        return "chosen"
    if c["verdict"]["passed"]:
        return "passes"
    return "; ".join(c["verdict"]["reasons"])


VERDICT_WORDS = {"reliable": "reliable", "provisional": "within noise", "fails": "fails"}


def _verdict_word(c: dict[str, Any]) -> str:
    """'reliable' (passes reliably), 'within noise' (passes on the point estimate only), 'fails (n)'."""
    if c["status"] == "error":
        return "error"
    word = VERDICT_WORDS[c["verdict"]["verdict"]]
    if c["verdict"]["verdict"] == "fails":
        word += f" ({len(c['verdict']['reasons'])})"
    return ("→ " if c["status"] == "chosen" else "") + word  # → marks the answer


# ---- terminal ----------------------------------------------------------------------------------


def print_report(report: dict[str, Any], console, paths: dict[str, Path] | None = None) -> None:
    """The figures table, the pass rate per check, the recommendation and each other candidate's reasons."""
    from rich.table import Table

    suite = report["suite"]
    s = report["settings"]
    cands = report["candidates"]
    width = max(len(c["metrics"]["name"]) + 9 * c["metrics"]["cached"] for c in cands)  # " (cached)"
    decision = report["decision"]
    level = f"{decision.get('confidence', 0.95):.0%}"
    repeats = max((c["metrics"].get("repeats", 1) for c in cands), default=1)
    tail = latency_label(cands)
    few = f"; max = the largest of {tail[5:-1]} requests, too few for a p95" if tail != "p95" else ""
    table = Table(title=f"{suite['name']}: {suite['cases']} cases{f' × up to {repeats} runs' if repeats > 1 else ''}, "
                        f"{suite['hash']}, {s.get('concurrency')} requests in flight (latency in ms, [{level} interval]"
                        f"{few})", title_justify="left")
    table.add_column("candidate", no_wrap=True, min_width=min(width, 48))
    short = tail.split(" ")[0]  # "p95" or "max"
    for col in ("params", "weights", "accuracy", "schema", "TTFT p50", f"TTFT {short}", "tok/s",
                f"e2e {short}", "peak mem", "load peak", "$/1K out", "verdict"):
        table.add_column(col, justify="left" if col == "verdict" else "right", no_wrap=True)
    for c in cands:
        m = c["metrics"]
        color = {"reliable": "green", "provisional": "yellow"}.get(c["verdict"]["verdict"], "red")
        verdict = f"[{color}]{escape_rich(_verdict_word(c))}[/{color}]"
        name = m["name"] + (" (cached)" if m["cached"] else "")
        ci = m.get("accuracy_ci")
        table.add_row(escape_rich(name), _params(m["total_params"]), _bytes(m["weight_bytes"]),
                      _pct(m["accuracy"]) + (f" [{_interval(ci)}]" if ci else ""), _pct(m["schema_fidelity"]),
                      _ms(m["ttft_p50_ms"]),
                      _latency(m, "ttft_p95_ms", tail), _num(m["decode_tokens_per_s"]), _latency(m, "e2e_p95_ms", tail),
                      _bytes(m["peak_memory_bytes"]), _bytes(m.get("load_peak_bytes")),
                      _cost(m["cost_per_1k_output_tokens"]), verdict,
                      style="bold" if c["status"] == "chosen" else "dim" if c["status"] == "error" else "")
    console.print(table)
    if repeats > 1:
        flakes = Table(title="repeats: pass@k (any run passed), pass^k (every run), flaky cases", title_justify="left")
        for col in ("candidate", "runs", "pass@k", "pass^k", "flaky"):
            flakes.add_column(col, justify="left" if col in ("candidate", "flaky") else "right")
        for c in cands:
            m = c["metrics"]
            if not m["error"]:
                flakes.add_row(escape_rich(m["name"]), str(m.get("repeats", 1)), _pct(m.get("pass_at_k")),
                               _pct(m.get("pass_hat_k")), escape_rich(", ".join(m.get("flaky_cases") or []) or "none"))
        console.print(flakes)
    types = check_types(report)
    if types:
        checks = Table(title="pass rate per check", title_justify="left")
        checks.add_column("candidate", no_wrap=True)
        for t in types:
            checks.add_column(t, justify="right", no_wrap=True)
        for c in cands:
            if not c["metrics"]["error"]:
                checks.add_row(escape_rich(c["metrics"]["name"]), *[_pct(c["metrics"]["by_check"].get(t)) for t in types])
        console.print(checks)
    _print_verifier(cands, console)
    rows = comparison_rows(report)
    if rows:
        pairs = Table(title=f"paired, each against the next smaller (exact McNemar; * = significant at {level})",
                      title_justify="left")
        for col in COMPARISON_HEAD:
            pairs.add_column(col, justify="left" if col.startswith("smaller") else "right", no_wrap=True)
        for row in rows:
            pairs.add_row(*(escape_rich(v) for v in row.values()))
        console.print(pairs)
    for note in decision["notes"]:
        console.print(f"[yellow]note:[/yellow] {escape_rich(note)}")
    color = {"reliable": "green", "provisional": "yellow"}.get(decision.get("status"), "red")
    console.print(f"[bold {color}]recommendation:[/bold {color}] {escape_rich(decision['summary'])}")
    for c in cands:
        if c["status"] == "chosen":
            for note in c["verdict"]["notes"]:
                console.print(f"      [dim]{escape_rich(note)}[/dim]")
            if c["verdict"].get("within_noise"):
                console.print(f"  [yellow]→[/yellow] {escape_rich(c['metrics']['name'])}: within noise")
    for c in cands:
        if c["status"] == "chosen":
            pass
        elif not c["verdict"]["passed"]:
            console.print(f"  [red]✗[/red] {escape_rich(c['metrics']['name'])}: {escape_rich(_verdict_text(c))}")
            for note in c["verdict"]["notes"]:
                console.print(f"      [dim]{escape_rich(note)}[/dim]")
        elif c["status"] == "pass":
            console.print(f"  [blue]✓[/blue] {escape_rich(c['metrics']['name'])}: {escape_rich('; '.join(c['verdict']['notes'][:1]))}")
        shown = c["verdict"]["passed"] or c["status"] == "chosen"  # a plain fail's near misses would only clutter
        for why in c["verdict"].get("within_noise") or [] if shown else []:
            console.print(f"      [yellow]~[/yellow] [dim]{escape_rich(why)}[/dim]")
    for label, path in (paths or {}).items():
        console.print(f"{label}: {path}")
    deploy = report.get("deploy")
    if deploy:
        if deploy.get("command"):
            console.print(f"[bold]deploy:[/bold] {escape_rich(deploy['command'])}")
        console.print(f"[bold]requirements file:[/bold] {escape_rich(deploy['chosen_line'])}")


def _print_verifier(cands: list[dict], console) -> None:
    """--verifier: its effect on each candidate's accuracy."""
    from rich.table import Table

    rows = [(c["metrics"]["name"], c["metrics"].get("verifier")) for c in cands if c["metrics"].get("verifier")]
    if not rows:
        return
    v0 = rows[0][1]
    table = Table(title=f"verifier {v0['spec']} (threshold {v0['threshold']:g}): its effect on accuracy",
                  title_justify="left")
    for col in ("candidate", "accuracy", "passed: accuracy", "refused", "wrong caught", "right rejected",
                "mean score"):
        table.add_column(col, justify="left" if col == "candidate" else "right", no_wrap=True)
    for name, v in rows:
        table.add_row(escape_rich(name), _pct(v["accuracy"]), _pct(v["accuracy_passed"]), _pct(v["refusal_rate"]),
                      f"{v['caught']}/{v['wrong']}", f"{v['rejected_right']}/{v['right']}", _num(v["mean_score"], 2))
    console.print(table)


def escape_rich(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


# ---- HTML --------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;color:#1f2328;max-width:1160px;margin:24px auto;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.meta{color:#57606a;font-size:12px} code{background:#f6f8fa;padding:1px 4px;border-radius:4px}
.rec{border:1px solid #4ac26b;background:#dafbe1;border-radius:8px;padding:12px 16px;margin:16px 0;font-size:15px}
.rec.none{border-color:#ff8182;background:#ffebe9} .rec.provisional{border-color:#d4a72c;background:#fff8c5}
.noise{color:#9a6700} pre.deploy{font-size:13px;background:#f6f8fa;border:1px solid #d0d7de}
table{border-collapse:collapse;width:100%;font-size:12.5px} th,td{border-bottom:1px solid #eaeef2;padding:5px 7px;text-align:right;vertical-align:top}
th{background:#f6f8fa;font-weight:600} td.l,th.l{text-align:left}
tr.row-chosen td{background:#f0fff4} tr.row-error td{color:#8c959f} .fail{color:#cf222e} .pass{color:#1a7f37} .dim{color:#8c959f}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(540px,1fr));gap:12px}
.plot{border:1px solid #d0d7de;border-radius:8px;padding:8px} .plot h3{font-size:13px;margin:2px 4px 6px}
details{border-bottom:1px solid #eaeef2;padding:4px 0} summary{cursor:pointer;list-style:none;display:flex;gap:8px;align-items:center}
summary::-webkit-details-marker{display:none} .cell{display:inline-block;min-width:22px;text-align:center;border-radius:4px;font-size:12px;padding:1px 4px}
.cell.ok{background:#dafbe1;color:#1a7f37} .cell.no{background:#ffebe9;color:#cf222e} .cell.na{background:#f6f8fa;color:#8c959f}
.case{padding:6px 4px 10px 28px} pre{white-space:pre-wrap;background:#f6f8fa;border-radius:6px;padding:6px 8px;margin:4px 0;font-size:12px}
.heat td{text-align:center} ul.why{margin:8px 0 0;padding-left:18px;font-size:13px} ul.why li{margin:2px 0}
table.figures td{white-space:nowrap}
"""


def write_html(report: dict[str, Any], path: Path) -> None:
    path.write_text(render_html(report), encoding="utf-8")


def render_html(report: dict[str, Any]) -> str:
    suite, decision, req = report["suite"], report["decision"], report["requirements"]
    cands = report["candidates"]
    names = [c["metrics"]["name"] for c in cands]
    out = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>rung bench: {escape(suite['name'])}</title>"
           f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{CSS}</style></head><body>"]
    out.append(f"<h1>rung bench: {escape(suite['name'])}</h1>")
    version = f" version {escape(str(suite['version']))}" if suite.get("version") else ""
    m = report["machine"]
    wall = f" · ran in {report['wall_s']:.0f} s" if report.get("wall_s") else ""
    out.append(f"<div class=meta>suite <code>{escape(suite['hash'])}</code>{version}, {suite['cases']} cases"
               f"{' from ' + escape(str(suite['source'])) if suite.get('source') else ''} · "
               f"{report['settings'].get('concurrency')} requests in flight, seed {report['settings'].get('seed')} · "
               f"{escape(str(m.get('platform')))}, {m.get('cpus')} CPUs{', ' + escape(m['gpu']) if m.get('gpu') else ''}, "
               f"torch {escape(str(m.get('torch')))} · rung {escape(report['rung'])} · {escape(report['created'])}"
               f"{wall}</div>")
    status = decision.get("status", "reliable" if decision["chosen"] else "none")
    cls = {"reliable": "rec", "provisional": "rec provisional"}.get(status, "rec none")
    out.append(f"<div class='{cls}'><b>Recommendation{' (provisional)' if status == 'provisional' else ''}:</b> "
               f"{escape(decision['summary'])}")
    for c in cands:
        if c["status"] == "chosen":
            out.extend(f"<div class=dim>{escape(n)}</div>" for n in c["verdict"]["notes"])
    out.append("<ul class=why>")
    for c in cands:
        name = escape(c["metrics"]["name"])
        if c["status"] == "chosen":
            continue
        if c["verdict"]["passed"]:
            out.append(f"<li><span class=pass>✓</span> <b>{name}</b>: {escape('; '.join(c['verdict']['notes'][:1]))}</li>")
        else:
            notes = "".join(f"<div class=dim>{escape(n)}</div>" for n in c["verdict"]["notes"])
            out.append(f"<li><span class=fail>✗</span> <b>{name}</b>: {escape('; '.join(c['verdict']['reasons']))}{notes}</li>")
    out.append("</ul>")
    noisy = [(c["metrics"]["name"], w) for c in cands if c["verdict"]["passed"] or c["status"] == "chosen"
             for w in c["verdict"].get("within_noise") or []]
    if noisy:
        out.append("<ul class=why>" + "".join(f"<li class=noise>~ <b>{escape(n)}</b>: {escape(w)}</li>" for n, w in noisy)
                   + "</ul>")
    for note in decision["notes"]:
        out.append(f"<div class=meta>note: {escape(note)}</div>")
    out.append(_deploy_html(report.get("deploy")))
    out.append("</div>")
    out.append(_requirements_html(req))
    out.append(_comparisons_html(report))

    # the table: figures only; pass rates per check live in the heat map below
    types = check_types(report)
    level = f"{decision.get('confidence', 0.95):.0%}"
    tail = latency_label(cands)
    head = ["candidate", "params", "weights", f"accuracy ({level} CI)", "schema fidelity", f"TTFT p50 / {tail}",
            "decode tok/s", f"e2e {tail}", "throughput tok/s", "peak memory serving / loading", "$ per 1K output tokens", "verdict"]
    out.append("<h2>Candidates, smallest first</h2><table class=figures><tr>" +
               "".join(f"<th class={'l' if h in ('candidate', 'verdict') else 'r'}>{escape(h)}</th>" for h in head) + "</tr>")
    for c in cands:
        mm = c["metrics"]
        verdict = "did not run" if c["status"] == "error" else _verdict_word(c)
        vcls = {"reliable": "pass", "provisional": "noise"}.get(c["verdict"].get("verdict"), "fail")
        cells = [f"<td class=l><b>{escape(mm['name'])}</b>{' <span class=dim>(cached)</span>' if mm['cached'] else ''}</td>",
                 f"<td>{_params(mm['total_params'])}</td>", f"<td>{_bytes(mm['weight_bytes'])}</td>",
                 f"<td>{_pct(mm['accuracy'])}{_ci(mm.get('accuracy_ci'))}</td>", f"<td>{_pct(mm['schema_fidelity'])}</td>",
                 f"<td>{_ms(mm['ttft_p50_ms'])} / {_latency(mm, 'ttft_p95_ms', tail)} ms"
                 f"{_ms_ci(mm.get('ttft_p95_ci'))}</td>", f"<td>{_num(mm['decode_tokens_per_s'])}</td>",
                 f"<td>{_latency(mm, 'e2e_p95_ms', tail)} ms{_ms_ci(mm.get('e2e_p95_ci'))}</td>", f"<td>{_num(mm['throughput_tokens_per_s'])}</td>",
                 f"<td>{_bytes(mm['peak_memory_bytes'])} / {_bytes(mm.get('load_peak_bytes'))}</td>",
                 f"<td title='{escape(mm['cost_basis'])}'>{_cost(mm['cost_per_1k_output_tokens'])}</td>",
                 f"<td class='l {vcls}'>{escape(verdict)}</td>"]
        out.append(f"<tr class=row-{c['status']}>{''.join(cells)}</tr>")
    out.append("</table>")
    prompts = [c["metrics"] for c in cands if c["metrics"]["prompt_tokens_p50"] is not None]
    if prompts:
        p = prompts[0]
        out.append(f"<div class=meta>prompt length of the suite ({escape(p['name'])}'s tokenizer): "
                   f"p50 {p['prompt_tokens_p50']:,.0f}, p95 {p['prompt_tokens_p95']:,.0f} tokens"
                   + (f"; your requests' context p95: {req['context_p95']:,} tokens" if req.get("context_p95") else "")
                   + "</div>")

    out.append(_verifier_html(cands))

    # plots
    success = req.get("success") or {}
    acc = success.get("accuracy")
    points_cost = [Point(c["metrics"]["name"], c["metrics"]["cost_per_1k_output_tokens"], c["metrics"]["accuracy"], c["status"])
                   for c in cands]
    lat_key = "ttft_p95_ms" if "ttft_p95_ms" in success or "e2e_p95_ms" not in success else "e2e_p95_ms"
    lat_label = "time to first token p95 (ms)" if lat_key == "ttft_p95_ms" else "end-to-end latency p95 (ms)"
    points_lat = [Point(c["metrics"]["name"], c["metrics"][lat_key], c["metrics"]["accuracy"], c["status"]) for c in cands]
    series = [(c["metrics"]["name"], c["metrics"]["e2e_ms"], c["metrics"]["ttft_ms"]) for c in cands if not c["metrics"]["error"]]
    out.append("<h2>Quality, cost and latency</h2><div class=plots>")
    out.append(f"<div class=plot><h3>Accuracy against cost per 1K output tokens ($)</h3>"
               f"{scatter(points_cost, 'cost per 1K output tokens ($)', 'accuracy', success.get('cost_per_1k_output_tokens'), acc)}</div>")
    out.append(f"<div class=plot><h3>Accuracy against latency</h3>{scatter(points_lat, lat_label, 'accuracy', success.get(lat_key), acc)}</div>")
    out.append(f"<div class=plot><h3>Latency distributions</h3>{distributions(series, 'milliseconds', success.get('e2e_p95_ms'))}</div>")
    out.append(f"<div class=plot><h3>Pass rate per check and slice</h3>{_heat_html(report, types)}</div>")
    out.append("</div>")

    # per-case outcomes
    out.append("<h2>Cases</h2><div class=meta>click a case for its input, checks and every candidate's answer</div>")
    out.append("<div><div style='display:flex;gap:8px;padding:4px 0;font-weight:600'><span style='min-width:220px'>case</span>"
               + "".join(f"<span class=cell title='{escape(n)}'>{i + 1}</span>" for i, n in enumerate(names)) + "</div>")
    out.append("<div class=meta>" + " · ".join(f"{i + 1} = {escape(n)}" for i, n in enumerate(names)) + "</div>")
    for case in report["cases"]:
        out.append(_case_html(case, names))
    out.append("</div>")
    if report.get("deploy"):
        out.append(f"<h2>Deploy</h2>{_deploy_html(report['deploy'])}")
    out.append(_evidence_html(report))
    out.append("</body></html>")
    return "".join(out)


def _evidence_html(report: dict[str, Any]) -> str:
    """What was measured, exactly: rung's version, the suite's hash, the settings, each candidate's
    weight files by sha256 (rung/bench/evidence.py), so an incident traces back to them."""
    suite = report["suite"]
    rows = []
    for c in report["candidates"]:
        w = c["info"].get("weights") or {}
        digest = w.get("sha256")
        files = w.get("files") or []
        detail = (f"{len(files)} file{'s' if len(files) != 1 else ''}: "
                  + ", ".join(f"{f['name']} {f['sha256'][:12]}" for f in files[:6]) + (" ..." if len(files) > 6 else "")
                  if digest else w.get("note", "not recorded"))
        rows.append(f"<tr><td class=l><b>{escape(c['metrics']['name'])}</b></td>"
                    f"<td class=l><code>{escape(digest or '-')}</code></td><td class=l>{escape(detail)}</td></tr>")
    settings = json.dumps(report["settings"], sort_keys=True, default=str)
    return ("<h2 id=evidence>Evidence</h2><div class=meta>"
            f"rung {escape(report['rung'])} · suite {escape(suite['name'])} <code>{escape(suite['hash'])}</code>"
            f"{' version ' + escape(str(suite['version'])) if suite.get('version') else ''} · created "
            f"{escape(report['created'])}</div><div class=meta>settings <code>{escape(settings)}</code></div>"
            "<table class=figures><tr><th class=l>candidate</th><th class=l>weights sha256</th><th class=l>files</th></tr>"
            + "".join(rows) + "</table>")


def _deploy_html(deploy: dict | None) -> str:
    if not deploy:
        return ""
    lines = ([f"# serve it the way it was measured\n{deploy['command']}"] if deploy.get("command") else []) + [
        f"# in the requirements file, for rung bench --check\n{deploy['chosen_line']}"]
    return f"<pre class=deploy>{escape(chr(10).join(lines))}</pre>"


def _comparisons_html(report: dict[str, Any]) -> str:
    rows = comparison_rows(report)
    if not rows:
        return ""
    level = f"{report['decision'].get('confidence', 0.95):.0%}"
    out = [f"<h2>Paired comparisons: each candidate against the next smaller</h2><div class=meta>Both answer the same "
           f"cases: the exact McNemar test on the cases where they differ, the difference in pass rate (larger − smaller) "
           f"with its {level} interval (Newcombe; a case bootstrap with repeats), and the paired bootstrap of per-case "
           f"latency. * = significant at {level}.</div><table class=figures><tr>"
           + "".join(f"<th class={'l' if h.startswith('smaller') else 'r'}>{escape(h)}</th>" for h in COMPARISON_HEAD)
           + "</tr>"]
    for row in rows:
        cells = list(row.values())
        out.append(f"<tr><td class=l><b>{escape(cells[0])}</b></td>" + "".join(f"<td>{escape(v)}</td>" for v in cells[1:])
                   + "</tr>")
    return "".join(out) + "</table>"


def _verifier_html(cands: list[dict]) -> str:
    """--verifier: its effect on each candidate's accuracy."""
    rows = [(c["metrics"]["name"], c["metrics"].get("verifier")) for c in cands if c["metrics"].get("verifier")]
    if not rows:
        return ""
    v0 = rows[0][1]
    head = ["candidate", "accuracy", "accuracy of the answers it passes", "refused", "wrong answers caught",
            "right answers rejected", "mean score"]
    out = [f"<h2>Verifier {escape(v0['spec'])} (threshold {v0['threshold']:g})</h2><table class=figures><tr>"
           + "".join(f"<th class={'l' if h == 'candidate' else 'r'}>{escape(h)}</th>" for h in head) + "</tr>"]
    for name, v in rows:
        out.append(f"<tr><td class=l><b>{escape(name)}</b></td><td>{_pct(v['accuracy'])}</td>"
                   f"<td>{_pct(v['accuracy_passed'])}</td><td>{_pct(v['refusal_rate'])}</td>"
                   f"<td>{v['caught']} of {v['wrong']}</td><td>{v['rejected_right']} of {v['right']}</td>"
                   f"<td>{_num(v['mean_score'], 2)}</td></tr>")
    return "".join(out) + "</table>"


def _ci(ci) -> str:
    if not ci:
        return ""
    return f" <span class=dim title='Wilson interval'>({ci[0] * 100:.0f}–{ci[1] * 100:.0f})</span>"


def _ms_ci(ci) -> str:
    return "" if not ci else f"<br><span class=dim title='bootstrap interval'>({ci[0]:,.0f}–{ci[1]:,.0f})</span>"


def _requirements_html(req: dict[str, Any]) -> str:
    s = req.get("success") or {}
    items = []
    labels = {"accuracy": "accuracy ≥ {:.0%}", "slice_accuracy": "each language and domain ≥ {:.0%}", "schema_fidelity": "schema fidelity ≥ {:.0%}", "ttft_p95_ms": "TTFT p95 ≤ {:,} ms",
              "e2e_p95_ms": "end-to-end p95 ≤ {:,} ms", "decode_tokens_per_s": "decode ≥ {} tokens/s",
              "cost_per_1k_output_tokens": "cost ≤ ${} per 1K output tokens"}
    for key, fmt in labels.items():
        if key in s:
            items.append(fmt.format(s[key]))
    items += [f"{k} pass rate ≥ {v:.0%}" for k, v in (s.get("checks") or {}).items()]
    if req.get("context_p95"):
        items.append(f"context p95 {req['context_p95']:,} tokens")
    if req.get("languages"):
        items.append("languages: " + ", ".join(req["languages"]))
    if req.get("domains"):
        items.append("domains: " + ", ".join(req["domains"]))
    if req.get("memory_bytes"):
        items.append(f"memory ≤ {_bytes(req['memory_bytes'])}")
    if req.get("price_per_hour") is not None:
        items.append(f"hardware ${req['price_per_hour']}/hour")
    if not req.get("external_endpoints", True):
        items.append("no external endpoints")
    if req.get("licenses"):
        items.append("licenses: " + ", ".join(req["licenses"]))
    if req.get("redaction"):
        items.append("redaction on")
    items.append(f"confidence {req.get('confidence', 0.95):.0%}")
    source = f" ({escape(req['source'])})" if req.get("source") else ""
    return f"<div class=meta><b>Requirements{source}:</b> {escape(' · '.join(items) or 'none given')}</div>"


def _heat_html(report: dict[str, Any], types: list[str]) -> str:
    cands = report["candidates"]
    tags = sorted({t for c in cands for t in c["metrics"]["by_tag"]})
    rows = [(t, "by_check") for t in types] + [(t, "by_tag") for t in tags]
    html = ["<table class=heat><tr><th class=l></th>" + "".join(f"<th>{escape(c['metrics']['name'])}</th>" for c in cands) + "</tr>"]
    for key, where in rows:
        cells = []
        for c in cands:
            v = c["metrics"][where].get(key)
            if v is None:
                cells.append("<td class=dim>—</td>")
            else:
                # white at 0 %, green at 100 %
                g = int(255 - 120 * v)
                cells.append(f"<td style='background:rgb({g},{255 - int(30 * v)},{g})'>{v:.0%}</td>")
        html.append(f"<tr><td class=l>{escape(key)}</td>{''.join(cells)}</tr>")
    html.append("</table>")
    return "".join(html)


def _case_html(case: dict[str, Any], names: list[str]) -> str:
    cells = []
    for n in names:
        o = case["outcomes"].get(n)
        if o is None:
            cells.append("<span class='cell na'>·</span>")
        elif any(c.get("unsupported") for c in o["checks"]):
            cells.append("<span class='cell na' title='unsupported'>n/a</span>")
        elif n in (case.get("repeats") or {}):
            r = case["repeats"][n]
            cls = "ok" if r["pass_hat_k"] else "no" if not r["pass_at_k"] else "na"
            cells.append(f"<span class='cell {cls}' title='passed {r['passed']} of {r['runs']} runs'>"
                         f"{r['passed']}/{r['runs']}</span>")
        else:
            cells.append(f"<span class='cell {'ok' if o['passed'] else 'no'}'>{'✓' if o['passed'] else '✗'}</span>")
    tags = " ".join(f"{k}={v}" for k, v in case["tags"].items())
    body = ["<div class=case>"]
    if isinstance(case["input"], str):
        body.append(f"<div><b>text</b></div><pre>{escape(case['input'])}</pre>")
    else:
        for msg in case["input"]:
            body.append(f"<div><b>{escape(str(msg.get('role')))}</b></div><pre>{escape(str(msg.get('content')))}</pre>")
    body.append(f"<div><b>checks</b></div><pre>{escape(json.dumps(case['checks'], ensure_ascii=False))}</pre>")
    for n in names:
        o = case["outcomes"].get(n)
        if o is None:
            continue
        sample = o["samples"][o["chosen"]] if o["samples"] else None
        answer = "" if sample is None else (sample.get("error") and f"(error) {sample['error']}") or sample["text"]
        if sample and sample.get("tool_calls"):
            answer += "\ntool calls: " + json.dumps(sample["tool_calls"], ensure_ascii=False)
        details = "; ".join(c["detail"] for c in o["checks"] if c["detail"])
        if any(c["type"] == "perplexity" for c in o["checks"]):
            details = "; ".join(f"perplexity {c['score']:.2f}" if not c.get("unsupported") else c["detail"]
                                for c in o["checks"]) + (f"; {details}" if details and not o["passed"] else "")
        mark = "pass" if o["passed"] else "fail"
        timing = ""
        if sample and sample.get("latency_s"):
            timing = f" · {sample['output_tokens']} tokens in {sample['latency_s'] * 1000:,.0f} ms"
        votes = f" · {len(o['samples'])} samples, vote picked #{o['chosen'] + 1}" if len(o["samples"]) > 1 else ""
        body.append(f"<div><b>{escape(n)}</b> <span class={mark}>{mark}</span>"
                    f"<span class=dim>{escape(timing + votes)}</span> {escape(details)}</div>")
        if answer:
            body.append(f"<pre>{escape(answer)}</pre>")
    body.append("</div>")
    return (f"<details><summary><span style='min-width:220px'>{escape(case['id'])} <span class=dim>{escape(tags)}</span></span>"
            f"{''.join(cells)}</summary>{''.join(body)}</details>")
