"""From one row of logits to the next token: penalties, temperature, top-k, top-p, min-p, a
seeded draw, and the logprobs a caller asked for.

A row may hold NaN or inf (a model that overflowed, a broken checkpoint): NaN counts as -inf (never
drawn), tokens at +inf share the draw (the limit of logits growing without bound), and a row with
nothing left to draw raises NoTokenError, which the engine turns into the end of that sequence
alone. Temperature divides logits after the largest is subtracted, so a tiny temperature cannot
overflow either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rung.engine.sampling_params import SamplingParams


@dataclass
class Sampled:
    token: int
    logprob: float | None = None  # of the chosen token under the model's raw distribution
    top_logprobs: dict[int, float] | None = None


class NoTokenError(ValueError):
    """Every token's logit is -inf or NaN (after masks and penalties): nothing can be drawn."""


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """logits [vocab] float32 with no NaN and no +inf: NaN → -inf; when some are +inf, those
    tokens become 0 and the rest -inf. Raises NoTokenError when every one is -inf or NaN."""
    top = logits.max()
    if bool(torch.isfinite(top)):  # the common case: one reduction and no copy (a NaN makes max NaN)
        return logits
    logits = logits.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    if bool(torch.isposinf(logits).any()):
        return torch.where(torch.isposinf(logits), 0.0, float("-inf"))
    if not bool(torch.isfinite(logits).any()):
        raise NoTokenError("no token can be sampled: every logit is -inf or NaN")
    return logits


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """logits [vocab] float32 → penalised copy. Repetition penalty (CTRL/HF) on every token seen,
    presence and frequency penalties (OpenAI) on the generated ones."""
    if params.repetition_penalty != 1.0 and (prompt or output):
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long, device=logits.device)
        values = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output:
        counts = torch.bincount(torch.tensor(output, device=logits.device), minlength=logits.shape[-1]).to(logits.dtype)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, as probabilities [vocab]."""
    logits = finite_logits(logits)
    logits = (logits - logits.max()) / params.temperature  # all <= 0: no overflow whatever the temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        probs = nucleus(probs, params.top_p)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs / probs.sum()


NUCLEUS_FIRST = 256  # candidates the top-p search sorts first (then 8x more, until their mass reaches top_p)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs [vocab] with only the smallest most-likely prefix whose mass reaches top_p kept (the
    token that crosses it included), the rest 0. The prefix is searched among the largest
    NUCLEUS_FIRST probabilities first, then eight times as many: once their mass reaches top_p
    every token after them is dropped anyway, so sorting the whole vocabulary (~4 ms at 49K on a
    CPU core, for each sampled row of each step) is needed only for a flat distribution."""
    n = probs.shape[-1]
    c = min(n, NUCLEUS_FIRST)
    while True:
        # (past an eighth of the vocabulary a whole sort is faster than a partial one)
        top, order = torch.topk(probs, c) if c < n else torch.sort(probs, descending=True)
        before = top.cumsum(-1) - top  # each candidate's mass ahead of it
        if c == n or float(before[-1] + top[-1]) >= top_p:
            kept = order[before < top_p]
            return torch.zeros_like(probs).index_copy_(0, kept, probs[kept])
        c = 8 * c if 8 * c <= n // 8 else n


def next_token_probs(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt: list[int] = (),
    output: list[int] = (),
    banned: list[int] = (),
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [vocab] → the distribution the next token is drawn from [vocab] float32: penalties,
    the tokens outside ``allowed`` ([vocab] bool, a grammar's mask) and ``banned`` tokens (EOS
    before min_tokens) masked, then temperature and the filters; greedy gives the one-hot of the
    argmax. ``sample`` draws from it, and speculative decoding verifies drafts against it, so both
    produce the same distribution."""
    logits = apply_penalties(logits.float(), params, list(prompt), list(output))
    if allowed is not None:
        logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    if banned:
        kept = logits.clone()
        kept[list(banned)] = float("-inf")
        if allowed is None or bool(torch.isfinite(kept).any()):  # a grammar that must end outranks min_tokens
            logits = kept
    if params.greedy:
        return torch.zeros_like(logits).index_fill_(0, torch.argmax(finite_logits(logits)).reshape(1), 1.0)
    return filtered_probs(logits, params)


def token_logprobs(logits: torch.Tensor, token: int, top: int | None) -> Sampled:
    """The chosen token's logprob under the raw distribution, and the ``top`` most likely. -inf
    (a token the raw logits rule out) is reported as -9999.0, as vLLM does: JSON has no infinity."""
    logprobs = torch.log_softmax(finite_logits(logits.float()), dim=-1).clamp(min=-9999.0)
    best = None
    if top:
        values, ids = torch.topk(logprobs, top)
        best = dict(zip(ids.tolist(), values.tolist()))
    return Sampled(token, float(logprobs[token]), best)


def draw(weights: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One index of ``weights`` [n] (≥ 0, not all 0; need not sum to 1), drawn with probability
    proportional to its weight: one uniform number in float64 against the cumulative sum (inverse
    transform sampling). ``torch.multinomial`` draws one exponential per entry for a single
    sample: ~1.1 ms at a 49K vocabulary on a CPU core, where this takes ~75 µs; in a sampled
    16-sequence decode step of SmolLM2-135M that was 18 ms of the step's ~45."""
    cdf = weights.double().cumsum(0)
    total = cdf[-1]
    if not bool(total > 0):
        raise NoTokenError("no token can be sampled: every probability is 0")
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    index = int(torch.searchsorted(cdf, u * total, right=True))  # the first cumulative weight above u · total
    if index >= cdf.shape[0]:  # u · total rounded up to the total: the last index of positive weight
        index = int(torch.nonzero(weights)[-1])
    return index


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    prompt: list[int] = (),
    output: list[int] = (),
    banned: list[int] = (),
    allowed: torch.Tensor | None = None,
) -> Sampled:
    """logits [vocab] → the next token. Tokens outside ``allowed`` and ``banned`` tokens (EOS before
    min_tokens) are masked."""
    probs = next_token_probs(logits, params, prompt, output, banned, allowed)
    if params.greedy:
        token = int(torch.argmax(probs))
    else:
        token = draw(probs, generator)
    if params.logprobs is None:
        return Sampled(token)
    return token_logprobs(logits, token, params.logprobs)
