"""`rung bench --verifier SPEC`: what a verifier in front of a candidate would do to its answers.

Each generating case's chosen answer is scored by the verifier (rung/govern/verify.py) from the
question (the last user message), the answer and the sources the candidate was given (the --rag
passages in the system message, else the conversation), exactly as `rung serve --verifier` would.
The verdict is kept on the case (``CaseOutcome.verifier``, so cached runs keep it); ``summary`` is the
verifier's effect on accuracy, per candidate:

- ``accuracy``: the candidate's accuracy on the verified cases, without the verifier;
- ``accuracy_passed``: accuracy of the answers the verifier let through;
- ``refusal_rate``: the share it would refuse (or flag);
- ``caught`` of ``wrong``: wrong answers it rejected; ``rejected_right`` of ``right``: right answers
  it rejected (the price of the catches).

Tool calls, failed requests and perplexity cases are not verified.
"""

from __future__ import annotations

from typing import Any


def verify_outcomes(verifier, threshold: float, outcomes: list, messages: dict[str, list[dict]]) -> None:
    """Score each outcome's chosen answer; ``messages``: case id → the conversation sent."""
    from rung.govern.verify import sources_of

    for outcome in outcomes:
        if outcome.case_id not in messages or not outcome.samples:
            continue
        sample = outcome.samples[min(outcome.chosen, len(outcome.samples) - 1)]
        if sample.error or sample.tool_calls or not sample.text.strip():
            continue
        question, sources = sources_of(messages[outcome.case_id])
        try:
            score, error = float(verifier.score(question, sample.text, sources)), None
        except Exception as e:  # fails closed, as in the server
            score, error = None, f"{type(e).__name__}: {' '.join(str(e).split())}"
        outcome.verifier = {"score": None if score is None else round(score, 4),
                            "passed": score is not None and score >= threshold, **({"error": error} if error else {})}


def summary(run, spec: str | None, threshold: float) -> dict[str, Any] | None:
    """The verifier's effect on one candidate's accuracy (None without a verifier or verdicts)."""
    verified = [c for c in run.cases if getattr(c, "verifier", None) and not c.unsupported]
    if not spec or not verified:
        return None
    right = [c for c in verified if c.passed]
    kept = [c for c in verified if c.verifier["passed"]]
    scores = [c.verifier["score"] for c in verified if c.verifier["score"] is not None]
    return {
        "spec": spec, "threshold": threshold, "verified": len(verified),
        "accuracy": len(right) / len(verified),
        "accuracy_passed": sum(c.passed for c in kept) / len(kept) if kept else None,
        "refusal_rate": 1 - len(kept) / len(verified),
        "wrong": len(verified) - len(right), "caught": sum(not c.passed and not c.verifier["passed"] for c in verified),
        "right": len(right), "rejected_right": sum(c.passed and not c.verifier["passed"] for c in verified),
        "mean_score": sum(scores) / len(scores) if scores else None,
    }
