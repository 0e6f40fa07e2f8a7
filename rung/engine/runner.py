"""The model runner: one forward pass over a scheduled batch, on the fastest path that runs it.

The engine hands the runner a step's token ids and chunks (engine/paged.py) and gets back the
logits of the rows it samples from. How the step runs is decided here, in one place:

- a decode-only batch (one token per sequence) replays a CUDA graph on a GPU with Triton
  (engine/cuda_graphs.py), or runs as one native call on the CPU when the quantization rewrite
  packed the model for the native kernels (engine/cpu_decode.py);
- anything else (prefill chunks, speculative chunks, a model or a batch those paths decline) runs
  eagerly: the model's forward over a ``PagedStep``, the reference the other two are tested against.

The fast paths compute the eager path's logits; they remove per-operation overhead, nothing else.

On the graph path the runner also keeps the device one step ahead of the host (engine/overlap.py):
``run_ahead`` launches a greedy decode step and leaves its tokens on the device (``ahead``), where
they are the input ids of the step after it; the engine reads them back one call later. Which
sequences may run ahead, and what their tokens mean, is the engine's business.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rung.engine.overlap import PendingTokens
from rung.engine.paged import Chunk, KVPool, PagedStep
from rung.quant.linear import native_prompts

if TYPE_CHECKING:
    from rung.engine.engine import EngineConfig


class ModelRunner:
    def __init__(self, model, pool: KVPool, config: EngineConfig, max_model_len: int):
        self.model, self.pool = model, pool
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.overlap = config.overlap
        self.graphs = self._graphs(config, max_model_len)  # DecodeGraphs on CUDA, else None
        self.cpu_decode = self._cpu_decode(config)  # CpuDecode on the CPU, else None
        self.ahead: PendingTokens | None = None  # a decode step launched ahead, its tokens not yet read

    def _graphs(self, config: EngineConfig, max_model_len: int):
        from rung.engine.cuda_graphs import DecodeGraphs, unsupported
        from rung.kernels import triton_available

        if not (config.cuda_graphs and self.device.type == "cuda" and triton_available()):
            return None
        if unsupported(self.model) is not None:
            return None
        return DecodeGraphs(self.model, self.pool, max_model_len, config.max_seqs)

    def _cpu_decode(self, config: EngineConfig):
        from rung.engine.cpu_decode import CpuDecode, unsupported

        if not (config.cpu_decode and self.device.type == "cpu" and self.dtype == torch.float32):
            return None
        return CpuDecode(self.model, self.pool) if unsupported(self.model) is None else None

    def run(self, ids: torch.Tensor, chunks: list[Chunk], rows: list[int] | None = None) -> torch.Tensor:
        """ids [N] (the chunks' tokens, in order) → logits [len(rows), vocab] float32 of the given
        rows (None: every row). Every chunk's keys and values are written to the pool either way."""
        fast = self.graphs if self.graphs is not None else self.cpu_decode  # one exists per device at most
        logits = None
        if fast is not None and all(ch.count == 1 for ch in chunks):
            logits = fast.run(ids, chunks)  # [N, vocab]; None: not this batch (too large, graphs off)
        if logits is None:
            # packed layers' prompt rows through the native kernels (quant/linear.py); the LM head's
            # too: a step of more than MAX_M rows with logits (decode rows beside a prompt's last)
            # would otherwise dequantize the whole head for one matmul
            with native_prompts():
                hidden = self.model.hidden_states(ids[None], PagedStep(self.pool, chunks, self.device))[0]  # [N, hidden]
                if rows == []:  # prefill chunks only: no logits wanted
                    return torch.empty(0, self.model.config.vocab_size)
                return self.model.logits(hidden if rows is None else hidden[rows])
        return logits if rows is None or len(rows) == len(logits) else logits[rows]  # decode-only: row i is chunk i's

    # ---- one step ahead (engine/overlap.py) ---------------------------------------------------

    @property
    def runs_ahead(self) -> bool:
        """Whether this runner can launch decode steps ahead of the host (the graph path only)."""
        return self.overlap and self.graphs is not None

    def run_ahead(self, ids: torch.Tensor, chunks: list[Chunk], seqs: list) -> bool:
        """Launch one decode step of ``seqs`` (one chunk of one token each) with input ``ids`` [n]
        (host ids, or the previous step's tokens on the device) and keep its greedy tokens on the
        device as ``ahead``. False when the graphs cannot run this batch: nothing was launched."""
        logits = self.graphs.run(ids, chunks) if self.runs_ahead else None
        self.ahead = None if logits is None else PendingTokens(seqs, logits.argmax(-1))
        return self.ahead is not None

    def take_ahead(self) -> PendingTokens | None:
        """The step launched ahead, now the caller's to read (None: there is none)."""
        ahead, self.ahead = self.ahead, None
        return ahead
