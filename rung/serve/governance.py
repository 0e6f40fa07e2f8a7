"""The gateway's governance over one chat run: the tool-use policy (rung/govern/policy.py) and the
answer verifier (rung/govern/verify.py).

Tool policy, in two places:
- Tools a request declares that its key may not use are taken out of what the model sees (the
  request goes on with the others; ``X-Rung-Policy-Removed-Tools`` names them). A request that can
  only be served with a removed tool (``tool_choice`` names it, or ``required`` and none is left) is
  refused with 403.
- A call the model makes is held until its reply ends (a streamed call is sent only once it passed),
  then checked. A denied call never reaches the client: it is logged (one ``policy_denied`` line
  naming the rule, no argument values unless --log-prompts), counted, and written back into the
  conversation with a tool message ``{"error": "denied by policy: ..."}``; the model then answers
  again, up to the file's ``max_rounds``. A model that keeps calling what it may not ends its reply
  with a refusal (``finish_reason: content_filter``, the text in ``content`` and ``refusal``).

Verifier: each finished answer (not a tool call) is scored before it is returned, from the
question (the last user message), the answer and the sources (``sources_of``). Below the threshold
the answer is flagged (``"rung": {"verifier": ...}`` on the choice, ``X-Rung-Verifier: flagged``) or
refused (a refusal with ``finish_reason: content_filter``). A streamed answer is held until it is
verified, then sent.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass

from rung.govern.policy import Decision, Principal
from rung.govern.verify import sources_of  # noqa: F401 (app.py imports it from here)
from rung.serve import logs
from rung.serve.errors import APIError
from rung.serve.reasoning import CALL_KINDS, Event

POLICY_REFUSAL = "I can't do that: {reason}."
VERIFIER_REFUSAL = "I can't give that answer: it is not supported by the sources."


# ---- declared tools -------------------------------------------------------------------------------


def allowed_tools(principal: Principal | None, tools: list[dict] | None, choice) -> tuple[list[dict] | None, list[str]]:
    """The request's tools its key may use, and the names taken out; 403 when the request needs one
    that was taken out."""
    if principal is None or principal.rules is None or not tools:
        return tools, []
    kept, removed, why = [], [], {}
    for t in tools:
        name = t["function"]["name"]
        decision = principal.rules.tool(name)
        if decision.allowed:
            kept.append(t)
        else:
            removed.append(name)
            why[name] = decision
    named = None if isinstance(choice, str) or choice is None else choice.function.name
    if named in why:
        raise APIError(403, f"tool_choice names {named!r}, which this API key may not use: {why[named].reason} "
                            f"(rule {why[named].rule})", "tool_choice", "permission_denied")
    if choice == "required" and not kept:
        raise APIError(403, f"tool_choice is 'required' but this API key may use none of the tools "
                            f"({', '.join(removed)})", "tool_choice", "permission_denied")
    return kept or None, removed


# ---- calls the model makes ------------------------------------------------------------------------


@dataclass
class _Round:
    content: int = 0  # where this round's content and calls start in the choice
    calls: int = 0
    retries: int = 0
    extra: list | None = None  # messages after the request's: earlier rounds' calls and their errors


class ToolGate:
    """Holds each choice's tool calls until its reply ends, then lets them out or starts another round."""

    def __init__(self, run, principal: Principal, max_rounds: int):
        self.run, self.principal, self.max_rounds = run, principal, max_rounds
        self.rounds: dict[int, _Round] = {}
        self.denied = 0
        self.refused = 0
        self.rules_fired: list[str] = []

    async def feed(self, choice, events: list[Event], finish: str | None) -> tuple[list[Event], bool]:
        """The events to emit for one delta, and whether the choice finished (False while another
        round runs)."""
        events = [e for e in events if e.kind not in CALL_KINDS]
        if not finish:
            return events, False
        state = self.rounds.setdefault(choice.index, _Round())
        calls = choice.calls[state.calls:]
        if not calls:
            return events, True
        decisions = [self.principal.rules.call(c.name, c.arguments) for c in calls]
        denied = [(c, d) for c, d in zip(calls, decisions) if not d.allowed]
        if not denied:
            return events + [Event("tool_call", call=c) for c in calls], True
        for c, d in denied:
            self._record(c, d, state.retries + 1)
        content = "".join(choice.content[state.content:]).strip()
        del choice.calls[state.calls:]
        first = denied[0][1]
        if state.retries >= self.max_rounds:
            return events + self._refuse(choice, first), True
        history = (state.extra or []) + _round_messages(content, calls, decisions)
        try:
            await self.run.retry(choice, history)
        except APIError as e:  # the longer conversation no longer fits, ...: end here
            return events + self._refuse(choice, Decision(False, first.rule, f"{first.reason} ({e.message})")), True
        state.retries += 1
        state.extra = history
        state.content, state.calls = len(choice.content), len(choice.calls)
        choice.finish_reason = choice.stop_reason = None
        return events, False

    def _record(self, call, decision: Decision, round_: int) -> None:
        run = self.run
        self.denied += 1
        self.rules_fired.append(decision.rule)
        run.server.metrics.policy_denied(self.principal.name, decision.kind)
        logs.event_line("policy_denied", id=run.id, key=self.principal.name, tool=call.name, rule=decision.rule,
                        reason=decision.reason, round=round_,
                        arguments=call.arguments if run.server.config.log_prompts else None)

    def _refuse(self, choice, decision: Decision) -> list[Event]:
        self.refused += 1
        self.run.server.metrics.policy_refused(self.principal.name)
        text = POLICY_REFUSAL.format(reason=f"a tool call was denied by policy ({decision.reason})")
        return [Event("content", choice.refuse(text))]


def _round_messages(content: str, calls, decisions) -> list[dict]:
    """The model's turn with its calls, then one tool message per call: the error it gets instead
    of a result."""
    out = [{"role": "assistant", "content": content or None,
            "tool_calls": [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                           for c in calls]}]
    for c, d in zip(calls, decisions):
        error = (f"denied by policy: {d.reason}" if not d.allowed
                 else "not run: another call of the same turn was denied by policy; call it again if it is still needed")
        out.append({"role": "tool", "tool_call_id": c.id, "name": c.name, "content": json.dumps({"error": error})})
    return out


# ---- one run ----------------------------------------------------------------------------------------


class RunGovernance:
    """The governance of one run (rung/serve/run.py): its key's tool gate over the model's calls,
    the verifier over its answers (a streamed answer is held until verified), the tools the key
    lost; and what the response headers and the log line say of them."""

    def __init__(self, run, principal: Principal | None, verification: Verification | None):
        self.run, self.principal, self.verification = run, principal, verification
        prepared = run.prepared
        self.gate = (ToolGate(run, principal, run.server.policy.max_rounds)
                     if principal is not None and principal.rules is not None and any(p.tools for p in prepared)
                     else None)
        self.removed_tools = sorted({t for p in prepared for t in p.removed_tools})
        if self.removed_tools:
            run.server.metrics.tools_removed(principal.name, len(self.removed_tools))
        self._held: dict[int, list] = {}  # streamed (event, logprobs) pairs waiting for the verifier, per choice

    async def gate_events(self, choice, events: list[Event], finish: str | None) -> tuple[list[Event], bool]:
        """One delta's events past the tool gate, and whether the choice finished."""
        if self.gate is None:
            return events, bool(finish)
        return await self.gate.feed(choice, events, finish)

    async def verify(self, choice) -> bool:
        """Score a finished answer (not a tool call, not a refusal); True when it was replaced by a refusal."""
        if self.verification is None or choice.calls or choice.refusal or choice.finish_reason is None:
            return False
        answer = "".join(choice.content).strip()
        if not answer:
            return False
        run = self.run
        p = run.prepared[choice.index // run.req.n]
        passages = p.grounding.texts if getattr(p, "grounding", None) is not None else None  # --rag: what it saw
        question, sources = sources_of(p.messages or [], passages)
        started = time.perf_counter()
        verdict = await self.verification.check(question, answer, sources, run.server.metrics)
        if getattr(run, "trace", None) is not None:
            run.trace.add("verify", started, choice=choice.index, action=verdict.action)
        choice.verdict = verdict.json()
        if verdict.action == "refused":
            choice.refuse(VERIFIER_REFUSAL, replace=True)
            return True
        return False

    async def release(self, choice, pairs: list, finished: bool) -> list:
        """The streamed (event, logprobs) pairs to send now: with a verifier, none until the answer
        is finished and verified, then all of them as they came, or the refusal instead."""
        if self.verification is None:
            return pairs
        held = self._held.setdefault(choice.index, [])
        held += pairs
        if not finished:
            return []
        self._held[choice.index] = []
        if await self.verify(choice):
            return [(Event("content", choice.content[0]), None)]
        return held

    def headers(self, choices) -> dict:
        out = {}
        if self.removed_tools:
            out["X-Rung-Policy-Removed-Tools"] = ",".join(self.removed_tools)
        verdicts = [c.verdict for c in choices if c.verdict]
        if verdicts:
            worst = min(verdicts, key=lambda v: (v["passed"], v["score"] if v["score"] is not None else -1))
            out["X-Rung-Verifier"] = worst["action"]
            if worst["score"] is not None:
                out["X-Rung-Verifier-Score"] = f"{worst['score']:.4f}"
        return out

    def log_fields(self, choices) -> dict:
        """The request log line's fields: the key, the tools it lost, the calls denied, the verdicts."""
        out = {}
        if self.principal is not None:
            out["key"] = self.principal.name
        if self.removed_tools:
            out["tools_removed"] = self.removed_tools
        if self.gate is not None and self.gate.denied:
            out.update(policy_denied=self.gate.denied, policy_rules=self.gate.rules_fired,
                       policy_refused=self.gate.refused)
        verdicts = [c.verdict for c in choices if c.verdict]
        if verdicts:
            out["verifier"] = [{k: v[k] for k in ("score", "action")} for v in verdicts]
        return out


# ---- the verifier ---------------------------------------------------------------------------------


@dataclass
class Verdict:
    score: float | None
    passed: bool
    action: str  # "passed" | "flagged" | "refused" | "error"
    error: str | None = None

    def json(self) -> dict:
        out = {"score": None if self.score is None else round(self.score, 4), "passed": self.passed,
               "action": self.action}
        if self.error:
            out["error"] = self.error
        return out


class Verification:
    """A loaded verifier with its threshold and action, shared by every request of a server."""

    def __init__(self, verifier, threshold: float = 0.5, action: str = "refuse"):
        self.verifier, self.threshold, self.action = verifier, threshold, action
        self._lock = threading.Lock()  # a model verifier runs one forward at a time

    async def check(self, question: str, answer: str, sources: list[str], metrics=None) -> Verdict:
        start = time.perf_counter()

        def score() -> float:
            with self._lock:
                return self.verifier.score(question, answer, sources)

        try:
            value = await asyncio.to_thread(score)
            error = None
        except Exception as e:  # a failing verifier fails closed: the answer is not vouched for
            value, error = None, f"{type(e).__name__}: {' '.join(str(e).split())}"
        passed = value is not None and value >= self.threshold
        action = "passed" if passed else ("error" if error and self.action == "flag" else
                                          "refused" if self.action == "refuse" else "flagged")
        verdict = Verdict(value, passed, action, error)
        if metrics is not None:
            metrics.verified(action, value, time.perf_counter() - start)
        return verdict
