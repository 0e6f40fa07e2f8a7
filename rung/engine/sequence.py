"""One sequence being generated: its tokens, its block tables, its sampling state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from rung.engine.sampling_params import SamplingParams
from rung.engine.stops import StopStrings


class Status(enum.Enum):
    WAITING = "waiting"  # not started, or preempted by recompute
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted or paused with its KV blocks in CPU memory
    FINISHED = "finished"


@dataclass(eq=False)  # a sequence is itself: queue membership and removal go by identity
class Sequence:
    request_id: str
    index: int  # which of the request's n samples
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    arrival: int  # admission order: the latest arrival is preempted first
    detok: object  # IncrementalDetokenizer
    stops: StopStrings
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose keys and values are in the cache
    tables: list[list[int | None]] = field(default_factory=list)  # per KV group
    hashes: list[int] = field(default_factory=list)  # prefix hash of each full block computed so far
    swapped: list | None = None  # per group: (blocks, per-layer CPU copies)
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    pending_text: str = ""  # released text not yet handed to the caller
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[dict[int, float]] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.perf_counter)  # added to the engine
    first_scheduled_time: float | None = None  # first taken into a step (the end of its queue wait)
    first_token_time: float | None = None
    draft_ids: list[int] = field(default_factory=list)  # speculative guesses to verify in this step
    draft_probs: torch.Tensor | None = None  # [len(draft_ids), vocab]: their draft distributions; None: one-hot
    constraint: object | None = None  # this sample's grammar state (SamplingParams.constraint)

    def timings(self) -> dict[str, float | None]:
        """vLLM's RequestMetrics times (time.perf_counter seconds): arrival, first scheduled, first
        token, finished (now)."""
        return {"arrival_time": self.arrival_time, "first_scheduled_time": self.first_scheduled_time,
                "first_token_time": self.first_token_time, "finished_time": time.perf_counter()}

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
