"""Decode steps one ahead of the host: the greedy tokens of a step stay on the device.

A batch-1 decode step on a GPU replays its CUDA graph in 1.5–5 ms, and the host's share (the
scheduler, filling the graph's inputs, reading the tokens back, appending them, detokenizing)
is 0.3–0.5 ms of Python. Read back at once, the two add up. Instead, a decode-only batch of
plain-greedy sequences takes its argmax on the device, the tokens go to the host by a
non-blocking copy behind a CUDA event, and the model runner (engine/runner.py) launches the
next step, whose input ids are those device tokens, before the engine waits for that copy: the
GPU runs step n + 1 while the host appends step n's tokens (what vLLM calls async scheduling). A
sequence that stops on step n's token (EOS, a stop string, an abort) has had step n + 1 computed
for nothing: its token is dropped, its blocks are freed as usual, and the key it wrote went to a
block it still owned (stream order puts that write before anything a later owner of the block
runs). The engine never runs ahead past a known end (max_tokens, the context), and falls back to
its usual step whenever the batch would change (a request waiting, swapped or held, a sequence
gone) or holds a prompt's chunk.
"""

from __future__ import annotations

import torch


class PendingTokens:
    """One enqueued decode step's greedy tokens: ``tokens`` [n] on the device (the next step's
    input ids), and their copy on its way to pinned host memory."""

    def __init__(self, seqs: list, tokens: torch.Tensor):
        self.seqs, self.tokens = seqs, tokens
        if tokens.is_cuda:
            self.host = tokens.to("cpu", non_blocking=True)  # a pinned destination: truly asynchronous
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:  # CPU tensors are computed by the time they exist
            self.host, self.ready = tokens, None

    def wait(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()  # this step only: the one enqueued after it keeps running
        return self.host.tolist()
