"""The engine: requests in, a stream of token deltas out, many sequences per model step.

``Engine.add_request`` queues a prompt; each ``step`` runs one batched forward pass over the
scheduled chunks (model/cache.py's seam with a ``PagedStep``), samples every sequence whose
prompt is fully computed, and returns the new text per sequence. ``abort`` cancels a request and
frees its blocks at once. ``AsyncEngine`` drives steps on a background thread and streams per
request, for the server.
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass

import torch

from rung.engine.paged import KVPool, PagedStep
from rung.engine.sampler import sample
from rung.engine.sampling_params import SamplingParams
from rung.engine.scheduler import Scheduler
from rung.engine.sequence import Sequence, Status
from rung.engine.stops import StopStrings


@dataclass
class EngineConfig:
    block_size: int = 16
    kv_cache_bytes: int = 512 * 2**20  # KV pool size, all groups together
    num_blocks: int | None = None  # overrides kv_cache_bytes
    max_batch_tokens: int = 512  # tokens per step: decodes plus prefill chunks
    max_seqs: int = 64
    preempt: str = "recompute"  # or "swap": preempted sequences keep their KV in CPU memory
    prefix_caching: bool = True


@dataclass
class Delta:
    """New output of one sequence after a step."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None


class RequestError(ValueError):
    """A request the engine refuses (empty, too long for the context or the cache)."""


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None, seed: int = 0,
                 max_model_len: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = config or EngineConfig()
        mc = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        num_blocks = self.config.num_blocks or KVPool.blocks_for(mc, self.config.kv_cache_bytes,
                                                                 self.config.block_size, self.dtype)
        self.pool = KVPool(mc, num_blocks, self.config.block_size, self.dtype, self.device)
        self.scheduler = Scheduler(self.pool, self.config.max_batch_tokens, self.config.max_seqs,
                                   self.config.preempt, self.config.prefix_caching)
        self.max_model_len = max_model_len or mc.max_position_embeddings or 2048
        self._rng = torch.Generator().manual_seed(seed)
        self._arrivals = itertools.count()
        self._held: dict[str, list[Sequence]] = {}  # samples 2..n wait for sample 1's prefill
        self._sequences: dict[str, list[Sequence]] = {}
        self._paused: dict[str, list[Sequence]] = {}
        self.stats = dict(steps=0, prompt_tokens=0, cached_prompt_tokens=0, generated_tokens=0)

    # ---- requests -----------------------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        from rung.text.detok import IncrementalDetokenizer

        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._sequences:
            raise RequestError(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if any(not 0 <= t < self.model.config.vocab_size for t in prompt_ids):
            raise RequestError(f"prompt token ids must be in [0, {self.model.config.vocab_size})")
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise RequestError(f"prompt of {len(prompt_ids)} tokens does not fit the model's context of "
                               f"{self.max_model_len} tokens")
        longest = len(prompt_ids) + min(params.max_tokens or room, room)
        need = -(-longest // self.pool.block_size)
        if need > self.pool.num_blocks:
            raise RequestError(f"a sequence of {longest} tokens needs {need} KV blocks; the cache holds "
                               f"{self.pool.num_blocks} (raise kv_cache_bytes)")
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else self._rng
        seqs = [Sequence(request_id, i, list(prompt_ids), params, generator, next(self._arrivals),
                         IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens),
                         StopStrings(params.stop, params.include_stop_str_in_output))
                for i in range(params.n)]
        self._sequences[request_id] = seqs
        self.scheduler.add(seqs[0])
        if len(seqs) > 1:
            self._held[request_id] = seqs[1:]
        self.stats["prompt_tokens"] += len(prompt_ids)
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request: its sequences leave every queue and their blocks are freed now."""
        for seq in self._sequences.pop(request_id, []):
            if not seq.finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
        self._held.pop(request_id, None)

    def pause(self, request_id: str) -> None:
        """Move a request's KV blocks to CPU memory until ``resume`` (KV offload)."""
        for seq in self._sequences.get(request_id, []):
            if seq.status is Status.RUNNING:
                self.scheduler.running.remove(seq)
                self.scheduler.swap_out(seq)
                self._paused.setdefault(request_id, []).append(seq)

    def resume(self, request_id: str) -> None:
        for seq in self._paused.pop(request_id, []):
            self.scheduler.swapped.append(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._held)

    def free_blocks(self) -> list[int]:
        """Available blocks per KV group (equal to the pool size when nothing is held)."""
        return [g.allocator.available for g in self.pool.groups]

    # ---- one step -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Delta]:
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.waiting and not self.scheduler.running and not self.scheduler.swapped:
                raise RuntimeError("the KV cache cannot hold the next waiting sequence")
            return []
        self.stats["steps"] += 1
        ids = torch.tensor([[t for seq, n in batch for t in seq.all_ids[seq.num_computed: seq.num_computed + n]]],
                           device=self.device)
        context = PagedStep(self.pool, self.scheduler.chunks(batch), self.device)
        hidden = self.model.hidden_states(ids, context)[0]  # [N, hidden]
        rows, sampling, offset = [], [], 0
        for seq, n in batch:
            offset += n
            seq.num_computed += n
            self.scheduler.register_full_blocks(seq)
            if seq.cached_tokens and seq.num_computed == seq.num_tokens and not seq.output_ids:
                self.stats["cached_prompt_tokens"] += seq.cached_tokens
            if seq.num_computed == seq.num_tokens:  # caught up: the last row's logits give a token
                rows.append(offset - 1)
                sampling.append(seq)
        deltas = []
        if rows:
            logits = self.model.logits(hidden[rows])  # [S, vocab] float32
            for seq, row in zip(sampling, logits):
                deltas.append(self._advance(seq, row))
        self._release_held()
        return [d for d in deltas if d is not None]

    def _advance(self, seq: Sequence, logits: torch.Tensor) -> Delta | None:
        params = seq.params
        eos = set() if params.ignore_eos else set(self.tokenizer.eos_token_ids)
        banned = list(eos) if len(seq.output_ids) < params.min_tokens else []
        s = sample(logits, params, seq.generator, seq.prompt_ids, seq.output_ids, banned)
        seq.output_ids.append(s.token)
        self.stats["generated_tokens"] += 1
        if seq.first_token_time is None:
            seq.first_token_time = time.perf_counter()
        logprobs = [{s.token: s.logprob, **(s.top_logprobs or {})}] if params.logprobs is not None else None
        room = self.max_model_len - len(seq.prompt_ids)
        max_new = min(params.max_tokens or room, room)
        finish, stop_reason = None, None
        if s.token in eos or s.token in params.stop_token_ids:
            text = seq.stops.push(seq.detok.flush()) + seq.stops.flush()
            finish, stop_reason = "stop", s.token
        else:
            text = seq.stops.push(seq.detok.push(s.token))
            if seq.stops.stopped:
                finish, stop_reason = "stop", seq.stops.hit
            elif len(seq.output_ids) >= max_new:
                text += seq.stops.push(seq.detok.flush()) + seq.stops.flush()
                finish = "length"
        if finish:
            seq.finish_reason, seq.stop_reason = finish, stop_reason
            self.scheduler.finish(seq)
            if all(x.finished for x in self._sequences.get(seq.request_id, [])) and seq.request_id not in self._held:
                self._sequences.pop(seq.request_id, None)
        return Delta(seq.request_id, seq.index, text, [s.token], finish, stop_reason, logprobs)

    def _release_held(self) -> None:
        """Samples 2..n start once the first has its prompt in the cache: they take its full
        blocks from the prefix cache instead of computing them again."""
        for request_id, seqs in list(self._held.items()):
            first = self._sequences[request_id][0]
            if first.num_computed >= len(first.prompt_ids) or first.finished:
                for seq in seqs:
                    self.scheduler.add(seq)
                del self._held[request_id]

    # ---- synchronous driving ------------------------------------------------------------------

    def run(self, requests: list[tuple[list[int], SamplingParams]]) -> dict[str, list[Sequence]]:
        """Add the requests, step until all finish, return their sequences by request id."""
        ids = [self.add_request(p, sp) for p, sp in requests]
        seqs = {i: list(self._sequences[i]) for i in ids}
        while self.has_unfinished():
            self.step()
        return seqs
