"""Verifiers: a score in [0, 1] of how well an answer is supported by its sources.

``load_verifier(spec)`` reads one of:
- ``lexical``: the share of the answer's content words (numbers included) found in the sources. A
  cheap baseline, and deterministic for tests; it knows nothing of paraphrase or negation.
- ``python:MODULE:FUNCTION``: a callable ``(question, answer, sources) -> float`` in [0, 1] (a
  classifier of your own), imported from ``sys.path``.
- anything else: a model spec (``smollm2-135m``, a .gguf, a Hugging Face folder) of a second LLM,
  asked "Is the ANSWER supported by the SOURCES?" in its chat template. The score is
  P(yes) / (P(yes) + P(no)) of its next token, from one forward pass (the probabilities of the
  spellings "yes", " Yes", ... summed).

Every verifier has ``name`` and ``fingerprint()`` (what a bench cache key includes) and
``score(question, answer, sources)``.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import re
from pathlib import Path


class VerifierError(ValueError):
    """A verifier spec rung cannot load, or a verifier that returned no usable score."""


# ---- lexical overlap ------------------------------------------------------------------------------

_STOP = set("""a an the and or but if then than so of in on at to for from by with without as is are was were be been
being am do does did done have has had having it its it's this that these those there here their they them he she
his her him we our us you your i me my mine not no yes can could would should will shall may might must what which
who whom whose when where why how all any some each every both either neither one very just also only into onto
about over under again further more most other such own same too s t don doesn isn aren wasn weren won""".split())
_WORD = re.compile(r"[^\W_]+(?:[.,'][^\W_]+)*", re.UNICODE)


def content_words(text: str) -> list[str]:
    """Lower-cased words that carry meaning: numbers, and words of 3+ letters that are not stopwords."""
    out = []
    for w in _WORD.findall(text.lower()):
        w = w.strip(".,'")
        if any(ch.isdigit() for ch in w) or (len(w) >= 3 and w not in _STOP):
            out.append(w)
    return out


class LexicalVerifier:
    name = "lexical"

    def fingerprint(self) -> dict:
        return {"verifier": "lexical", "version": 1}

    def score(self, question: str, answer: str, sources: list[str]) -> float:
        words = content_words(answer)
        if not words:
            return 1.0  # nothing claimed ("Yes.", "OK")
        have = set(content_words(" ".join(sources)))
        have |= {w.rstrip("s") for w in have}  # plural or not
        return sum(w in have or w.rstrip("s") in have for w in words) / len(words)


# ---- a callable of your own -----------------------------------------------------------------------


class CallableVerifier:
    def __init__(self, spec: str):
        parts = spec.split(":")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise VerifierError(f"verifier {spec!r}: expected python:MODULE:FUNCTION")
        module_name, function = parts[1], parts[2]
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise VerifierError(f"verifier {spec!r}: cannot import {module_name}: {e}") from None
        fn = getattr(module, function, None)
        if not callable(fn):
            raise VerifierError(f"verifier {spec!r}: {module_name} has no function {function!r}")
        self.name, self.fn = spec, fn
        source = getattr(module, "__file__", None)
        self._digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()[:16] if source else None

    def fingerprint(self) -> dict:
        return {"verifier": self.name, "source_sha256": self._digest}

    def score(self, question: str, answer: str, sources: list[str]) -> float:
        value = self.fn(question, answer, list(sources))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise VerifierError(f"verifier {self.name} returned {value!r}, not a number in [0, 1]")
        return float(value)


# ---- a second model -------------------------------------------------------------------------------

SYSTEM = "You check answers against sources. Reply with one word: yes or no."
QUESTION = ("SOURCES:\n{sources}\n\nQUESTION: {question}\n\nANSWER: {answer}\n\n"
            "Is the ANSWER supported by the SOURCES? Reply yes or no.")
MAX_SOURCE_CHARS = 6000


class ModelVerifier:
    def __init__(self, spec: str, device: str = "cpu", dtype: str = "float32"):
        from rung.llm import LLM

        self.name = spec
        self.llm = LLM(spec, dtype=dtype, device=device)
        vocab = self.llm.tokenizer
        self.yes = _first_tokens(vocab, ("yes", "Yes", " yes", " Yes", "YES"))
        self.no = _first_tokens(vocab, ("no", "No", " no", " No", "NO"))
        if not self.yes or not self.no or self.yes & self.no:
            raise VerifierError(f"verifier {spec}: its tokenizer has no distinct tokens for yes and no")

    def fingerprint(self) -> dict:
        return fingerprint(self.name)

    def messages(self, question: str, answer: str, sources: list[str]) -> list[dict]:
        text = "\n".join(f"[{i + 1}] {s.strip()}" for i, s in enumerate(sources)) or "(none)"
        if len(text) > MAX_SOURCE_CHARS:
            text = text[:MAX_SOURCE_CHARS] + " ..."
        return [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": QUESTION.format(sources=text, question=question.strip(),
                                                            answer=answer.strip())}]

    def prompt(self, question: str, answer: str, sources: list[str]) -> str:
        return self.llm.apply_chat_template(self.messages(question, answer, sources))

    def score(self, question: str, answer: str, sources: list[str]) -> float:
        import torch

        # sources and answers are untrusted text: a special token in them stays text (LLM.encode_chat)
        _, ids = self.llm.encode_chat(self.messages(question, answer, sources))
        ids = ids[-self.llm.max_model_len:]
        with torch.inference_mode():
            logits = self.llm.model(torch.tensor([ids], device=self.llm.device))[0, -1].float()  # [vocab]
        logp = torch.log_softmax(logits, dim=-1)
        yes = torch.logsumexp(logp[list(self.yes)], 0).item()
        no = torch.logsumexp(logp[list(self.no)], 0).item()
        return 1.0 / (1.0 + math.exp(no - yes))  # P(yes) / (P(yes) + P(no))


def _first_tokens(tokenizer, spellings) -> set[int]:
    """The ids of spellings that are one token each."""
    out = set()
    for s in spellings:
        ids = tokenizer.encode(s, add_special_tokens=False)
        if len(ids) == 1:
            out.add(ids[0])
    return out


# ---- what a verifier reads ------------------------------------------------------------------------


def sources_of(messages: list[dict], passages: list[str] | None = None) -> tuple[str, list[str]]:
    """(question, sources) of a conversation: the question is the last user message; the sources
    are the passages retrieval added (when the server retrieved), else every system, developer and
    tool message and every earlier user message (where a client puts its retrieved text); with none
    of those, the last user message itself."""
    def text(m) -> str:
        c = m.get("content")
        if isinstance(c, list):
            return "".join(p.get("text") or "" for p in c if isinstance(p, dict))
        return c or ""

    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    question = text(messages[last]) if last is not None else ""
    if passages:
        return question, list(passages)
    sources = [text(m) for i, m in enumerate(messages)
               if (m.get("role") in ("system", "developer", "tool") or (m.get("role") == "user" and i != last))
               and text(m).strip()]
    # one message holding both the text and the question ("Context: ... Question: ..."): it is the source
    return question, sources or ([question] if question.strip() else [])


# ---- the spec -------------------------------------------------------------------------------------


def fingerprint(spec: str) -> dict:
    """What identifies a verifier's scores (for cache keys), without loading a model."""
    spec = spec.strip()
    if spec == "lexical":
        return LexicalVerifier().fingerprint()
    if spec.startswith("python:"):
        return CallableVerifier(spec).fingerprint()
    return {"verifier": "model", "spec": spec, "prompt": hashlib.sha256((SYSTEM + QUESTION).encode()).hexdigest()[:12]}


def load_verifier(spec: str, device: str = "cpu"):
    spec = spec.strip()
    if not spec:
        raise VerifierError("the verifier spec is empty")
    if spec == "lexical":
        return LexicalVerifier()
    if spec.startswith("python:"):
        return CallableVerifier(spec)
    return ModelVerifier(spec, device=device)
