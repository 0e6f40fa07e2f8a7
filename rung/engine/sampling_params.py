"""SamplingParams: what one request asks of the sampler, with vLLM's names and defaults.

Every field is checked here, once, for the offline API, the engine and the server alike (the
server turns the error into a 400 naming ``SamplingParamsError.param``). The ranges are vLLM's
(SamplingParams._verify_args) and OpenAI's, plus bounds on what a request could otherwise make
unbounded: the number of samples, stop strings and stop tokens. ``repetition_penalty`` divides
logits: vLLM only asks for > 0, but 1e-38 turns every seen token's logit into inf, so rung keeps
it in [0.01, 10], well beyond the 0.5-2 anyone uses.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

MAX_N = 128  # samples per request: each is a sequence with its own KV blocks
MAX_TEMPERATURE = 2.0  # OpenAI's and vLLM's
REPETITION_PENALTY_RANGE = (0.01, 10.0)
MAX_PENALTY = 2.0  # presence and frequency penalties, OpenAI's [-2, 2]
MAX_LOGPROBS = 20  # OpenAI's top_logprobs
MAX_STOPS = 16  # stop strings, each checked against the tail of the text at every token
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


class SamplingParamsError(ValueError):
    """A sampling parameter out of its range; ``param`` is the field's name."""

    def __init__(self, param: str, message: str):
        super().__init__(f"SamplingParams: {param} {message}")
        self.param = param


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # on prompt and output tokens (HF / vLLM)
    presence_penalty: float = 0.0  # on output tokens (OpenAI)
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16  # None: up to the model's context
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    seed: int | None = None
    logprobs: int | None = None  # number of top logprobs per generated token (0: only the chosen one)
    skip_special_tokens: bool = True
    # grammar-constrained decoding (structured output): a factory called once per sample, so each of
    # the n samples keeps its own grammar state. Its result's ``allowed(output_ids)`` returns the
    # [vocab] bool mask of the tokens allowed next, or None for any; the sampler masks the rest.
    constraint: Callable[[], Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        self.verify()

    def verify(self) -> None:
        """Normalise the fields (one stop string → a list, top_k -1 → 0) and raise
        SamplingParamsError naming the first one out of its range. The engine calls this again on
        every request: a dataclass can be changed after it was built."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not isinstance(self.stop, (list, tuple)):
            raise SamplingParamsError("stop", f"must be a string or a list of strings, got {type(self.stop).__name__}")
        self.stop = [s for s in (self.stop or []) if s != ""]
        if not isinstance(self.stop_token_ids or [], (list, tuple)):
            raise SamplingParamsError("stop_token_ids", "must be a list of token ids")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.n = _int("n", self.n, 1, MAX_N)
        self.temperature = _real("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        self.top_p = _real("top_p", self.top_p, 0.0, 1.0, low_open=True)
        self.top_k = _int("top_k", self.top_k, 0, None, "must be -1 or 0 (off) or at least 1")
        self.min_p = _real("min_p", self.min_p, 0.0, 1.0)
        self.repetition_penalty = _real("repetition_penalty", self.repetition_penalty, *REPETITION_PENALTY_RANGE)
        self.presence_penalty = _real("presence_penalty", self.presence_penalty, -MAX_PENALTY, MAX_PENALTY)
        self.frequency_penalty = _real("frequency_penalty", self.frequency_penalty, -MAX_PENALTY, MAX_PENALTY)
        if self.max_tokens is not None:
            self.max_tokens = _int("max_tokens", self.max_tokens, 1, None)
        self.min_tokens = _int("min_tokens", self.min_tokens, 0, self.max_tokens,
                               None if self.max_tokens is None else f"must be in [0, max_tokens={self.max_tokens}]")
        if len(self.stop) > MAX_STOPS:
            raise SamplingParamsError("stop", f"has {len(self.stop)} strings; at most {MAX_STOPS} are allowed")
        for s in self.stop:
            if not isinstance(s, str):
                raise SamplingParamsError("stop", f"must hold strings, got {type(s).__name__}")
            if len(s) > MAX_STOP_CHARS:
                raise SamplingParamsError("stop", f"strings must be at most {MAX_STOP_CHARS} characters, got {len(s)}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise SamplingParamsError("stop_token_ids", f"has {len(self.stop_token_ids)} ids; at most "
                                                        f"{MAX_STOP_TOKEN_IDS} are allowed")
        self.stop_token_ids = [_int("stop_token_ids", t, 0, None, "must hold non-negative token ids")
                               for t in self.stop_token_ids]
        if self.seed is not None:
            self.seed = _int("seed", self.seed, *SEED_RANGE)
        if self.logprobs is not None:
            self.logprobs = _int("logprobs", self.logprobs, 0, MAX_LOGPROBS)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


def _int(name: str, value, low: int, high: int | None, message: str | None = None) -> int:
    """``value`` as an int in [low, high] (high None: no upper bound), or SamplingParamsError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SamplingParamsError(name, f"must be an integer, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"in [{low}, {high}]"
        raise SamplingParamsError(name, f"{message or 'must be ' + bounds}, got {value}")
    return int(value)


def _real(name: str, value, low: float, high: float, low_open: bool = False) -> float:
    """``value`` as a finite float in [low, high] (or (low, high]), or SamplingParamsError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SamplingParamsError(name, f"must be a number, got {type(value).__name__}")
    value = float(value)
    inside = (low < value if low_open else low <= value) and value <= high  # False for NaN
    if not (math.isfinite(value) and inside):
        raise SamplingParamsError(name, f"must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value:g}")
    return value
