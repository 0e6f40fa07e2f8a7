"""Speculative decoding: cheap guesses of the next tokens, checked by the target model in one pass,
kept by a rule that leaves the output distribution exactly the target's.

A proposer guesses up to k tokens for a decoding sequence. ``NgramProposer`` looks the sequence's
last few tokens up earlier in its own prompt and output (prompt lookup decoding) and proposes what
followed them; ``DraftModelProposer`` runs a smaller model that shares the target's tokenizer,
with a contiguous KV cache of its own per sequence. The engine then runs the target over [last
token + guesses] as one chunk, so it has the target's next-token distribution after every prefix
of the guesses, and ``accept`` keeps a prefix of the guesses plus one token of the target's own.

The rule is speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding", Algorithm 1; Chen et al. 2023, "Accelerating Large Language Model Decoding
with Speculative Sampling"): a guess x drawn from the draft's q is accepted with probability
min(1, p(x) / q(x)); at the first rejection the token is drawn from normalize(max(0, p - q)); if
every guess is accepted a bonus token is drawn from the target's distribution after them. Each
emitted token is then distributed exactly as p, whatever q is. A deterministic guess (n-gram) is
a one-hot q. Greedy decoding reduces to: accept while the guess is the target's argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rung.engine.sampler import draw, next_token_probs
from rung.engine.sequence import Sequence


@dataclass
class Proposal:
    tokens: list[int] = field(default_factory=list)
    probs: torch.Tensor | None = None  # [len(tokens), vocab]: the q each guess was drawn from; None: one-hot


def accept(target_probs: torch.Tensor, draft_tokens: list[int], draft_probs: torch.Tensor | None,
           generator: torch.Generator | None = None, greedy: bool = False) -> list[int]:
    """Speculative sampling for one sequence.

    target_probs [k+1, vocab]: row j is the target's next-token distribution after the first j
    guesses (the engine's sampler processing: penalties, temperature, top-k/p, min-p).
    draft_tokens [k]: the guesses. draft_probs [k, vocab]: the distribution each guess was drawn
    from, or None for deterministic guesses. Returns the accepted guesses followed by one token of
    the target's (the correction at the first rejection, else the bonus from row k).
    """
    k = len(draft_tokens)
    p = target_probs.float().cpu()  # [k+1, vocab]
    if greedy:
        best = p.argmax(-1).tolist()
        a = 0
        while a < k and draft_tokens[a] == best[a]:
            a += 1
        return list(draft_tokens[:a]) + [best[a]]
    q = None if draft_probs is None else draft_probs.float().cpu()  # [k, vocab]
    u = torch.rand(k, generator=generator).tolist()
    for j, x in enumerate(draft_tokens):
        px, qx = float(p[j, x]), 1.0 if q is None else float(q[j, x])
        if u[j] * qx < px:  # u < min(1, p(x) / q(x))
            continue
        if q is None:
            residual = p[j].clone()
            residual[x] = 0.0  # max(0, p - onehot(x))
        else:
            residual = (p[j] - q[j]).clamp_(min=0.0)
        if not residual.sum() > 0:  # p <= q everywhere only if p == q, where rejecting had probability 0
            residual = p[j]
        return list(draft_tokens[:j]) + [draw(residual, generator)]
    return list(draft_tokens) + [draw(p[k], generator)]


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens (longest n
    first, from ``max_ngram`` down to ``min_ngram``) and propose the k tokens that followed it."""

    def __init__(self, k: int, max_ngram: int = 4, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"NgramProposer: need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.k, self.max_ngram, self.min_ngram = k, max_ngram, min_ngram

    def propose(self, seq: Sequence, limit: int | None = None) -> Proposal:
        k = self.k if limit is None else min(self.k, limit)
        ids = seq.all_ids
        if k <= 0 or len(ids) < 2:
            return Proposal()
        t = torch.tensor(ids)
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            # windows t[i:i+n] for i in [0, len - n): each is followed by at least one token
            windows = t[:-1].unfold(0, n, 1)  # [len - n, n]
            hits = (windows == t[-n:]).all(-1).nonzero()
            if len(hits):
                i = int(hits[-1])
                return Proposal(ids[i + n: i + n + k])
        return Proposal()

    def drop(self, seq: Sequence) -> None:
        pass  # no state


@dataclass
class _DraftState:
    cache: object  # the draft's KVCache for this sequence
    tokens: list[int] = field(default_factory=list)  # the ids whose keys and values the cache holds
    confirmed: int = 0  # the first tokens are the sequence's own (not guesses), known without comparing


class DraftModelProposer:
    """A second rung Decoder with the target's tokenizer (a smaller or more strongly quantized
    model) guesses k tokens, one forward pass each, sampling each with the request's parameters.
    Each sequence keeps a contiguous KVCache of the draft; positions holding rejected guesses are
    truncated away before the next proposal."""

    def __init__(self, draft_model, k: int):
        self.model, self.k = draft_model, k
        self.device = next(draft_model.parameters()).device
        self._states: dict[tuple[str, int], _DraftState] = {}

    @torch.inference_mode()
    def propose(self, seq: Sequence, limit: int | None = None) -> Proposal:
        ids = seq.all_ids
        k = self.k if limit is None else min(self.k, limit)
        if (max_pos := self.model.config.max_position_embeddings) is not None:
            k = min(k, max_pos - len(ids) + 1)  # the last guess fed sits at position len(ids) + k - 2
        if k <= 0:
            return Proposal()
        key = (seq.request_id, seq.index)
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _DraftState(self.model.new_cache())
        # keep what still holds the sequence's own tokens; the last token is always fed again if
        # need be, since its logits give the first guess
        keep = min(state.confirmed, len(ids) - 1)
        while keep < min(len(state.tokens), len(ids) - 1) and state.tokens[keep] == ids[keep]:
            keep += 1
        state.cache.truncate(keep)
        del state.tokens[keep:]
        state.confirmed = len(ids)
        params, output = seq.params, list(seq.output_ids)
        feed, tokens, probs = ids[keep:], [], []
        for _ in range(k):
            logits = self.model(torch.tensor([feed], device=self.device), state.cache)[0, -1]  # [vocab]
            state.tokens += feed
            # any q keeps speculative sampling exact; the request's own processing makes q close to p
            q = next_token_probs(logits, params, seq.prompt_ids, output + tokens)
            x = int(q.argmax()) if params.greedy else draw(q, seq.generator)
            tokens.append(x)
            probs.append(q)
            feed = [x]
        return Proposal(tokens, torch.stack(probs))

    def drop(self, seq: Sequence) -> None:
        """Forget a finished or cancelled sequence's draft cache."""
        self._states.pop((seq.request_id, seq.index), None)
