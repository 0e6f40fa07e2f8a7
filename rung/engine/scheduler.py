"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step, running sequences that are decoding get their one token first; then prompts are
prefilled in chunks within the step's token budget (so a long prompt never stalls the decodes
beside it). New requests join at the next step. When blocks run out, the latest-arrived running
sequence is preempted, by recompute (its blocks freed, its tokens prefilled again later) or by
swapping its blocks to CPU memory; preempted sequences resume before new ones start. Blocks are
taken from the prefix cache where a prompt's full blocks were computed before.

With speculative decoding a decoding sequence carries guesses (``draft_ids``): it runs its last
token and the guesses as one chunk when the budget and free blocks allow, and one token otherwise
(guesses never preempt anyone). After the step the engine keeps the accepted part and gives the
blocks past it back (``release_past_end``).
"""

from __future__ import annotations

import time

from collections import deque

from rung.engine.blocks import OutOfBlocks, block_hash
from rung.engine.paged import Chunk, KVPool
from rung.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, pool: KVPool, max_batch_tokens: int = 512, max_seqs: int = 64, preempt: str = "recompute",
                 prefix_caching: bool = True):
        if preempt not in ("recompute", "swap"):
            raise ValueError("preempt must be 'recompute' or 'swap'")
        self.pool, self.max_batch_tokens, self.max_seqs = pool, max_batch_tokens, max_seqs
        self.preempt_mode, self.prefix_caching = preempt, prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.swapped: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    # ---- queue --------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.tables = [[] for _ in self.pool.groups]
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.swapped or self.running)

    def all_sequences(self) -> list[Sequence]:
        return [*self.running, *self.swapped, *self.waiting]

    # ---- one step -----------------------------------------------------------------------------

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to run) for the next step, decodes first; [] if nothing can run."""
        budget = self.max_batch_tokens
        decodes, prefills = [], []
        by_arrival = sorted(self.running, key=lambda s: s.arrival)
        # decodes first (one token each, plus any guesses), then the prefills already under way
        for seq in [s for s in by_arrival if s.remaining == 1] + [s for s in by_arrival if s.remaining > 1]:
            n = min(seq.remaining + len(seq.draft_ids), budget)
            if seq.status is not Status.RUNNING or n == 0:
                continue  # preempted while making room for an earlier one, or no budget left
            if seq.draft_ids and n > 1 and not self.reserve(seq, n):
                n = 1  # no free blocks for the guesses: decode one token (guesses never preempt)
            if not self._make_room(seq, n):
                continue
            if seq.draft_ids:
                del seq.draft_ids[n - seq.remaining:]  # the guesses that fit this step
            (decodes if n == 1 else prefills).append((seq, n))
            budget -= n
        running = len(self.running)
        while self.swapped and running < self.max_seqs and self._swap_in(self.swapped[0]):
            seq = self.swapped.popleft()
            n = min(seq.remaining, budget)
            if n and self.reserve(seq, n):
                (decodes if n == 1 else prefills).append((seq, n))
                budget -= n
            running += 1
        while self.waiting and budget > 0 and running < self.max_seqs and not self.swapped:
            seq = self.waiting[0]
            if seq.num_computed == 0 and not any(seq.tables):
                self._take_cached_prefix(seq)
            n = min(seq.remaining, budget)
            if not self.reserve(seq, n):
                # keep nothing while waiting (the prefix cache still holds the blocks it matched)
                self._free(seq)
                seq.num_computed, seq.hashes, seq.cached_tokens = 0, [], 0
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.perf_counter()
            self.running.append(seq)
            (decodes if n == 1 else prefills).append((seq, n))
            budget -= n
            running += 1
        # a sequence scheduled early may have been preempted to make room for an earlier arrival
        return [(s, n) for s, n in decodes + prefills if s.status is Status.RUNNING]

    def chunks(self, batch: list[tuple[Sequence, int]]) -> list[Chunk]:
        return [Chunk(seq.tables, seq.num_computed, n) for seq, n in batch]

    # ---- blocks -------------------------------------------------------------------------------

    def _make_room(self, seq: Sequence, n: int) -> bool:
        """Reserve blocks for ``n`` more tokens of a running sequence, preempting later arrivals."""
        while not self.reserve(seq, n):
            victims = [s for s in self.running if s.status is Status.RUNNING and s is not seq]
            victim = max(victims, key=lambda s: s.arrival, default=None)
            if victim is None or victim.arrival < seq.arrival:
                self.preempt(seq)  # it is itself the latest: it waits
                return False
            self.preempt(victim)
        return True

    def reserve(self, seq: Sequence, n: int) -> bool:
        """Take blocks so that ``seq``'s positions up to num_computed + n - 1 have a slot in every
        group, without preempting anyone; sliding groups first release the blocks that fell out of
        their window. All or nothing: False (and no block taken) when the pool runs out. Blocks
        already there are kept, so asking again for the same positions takes nothing. ``schedule``
        calls it for each chunk; the engine calls it for a step it launches ahead of the schedule."""
        last = seq.num_computed + n - 1
        taken: list[tuple[int, int]] = []
        try:
            for g, group in enumerate(self.pool.groups):
                table = seq.tables[g]
                self._drop_out_of_window(seq, g)
                while len(table) <= last // self.pool.block_size:
                    table.append(group.allocator.allocate())
                    taken.append((g, len(table) - 1))
        except OutOfBlocks:
            for g, i in reversed(taken):
                self.pool.groups[g].allocator.release(seq.tables[g].pop(i))
            return False
        return True

    def _drop_out_of_window(self, seq: Sequence, g: int) -> None:
        group, bs = self.pool.groups[g], self.pool.block_size
        if group.window is None:
            return
        first = group.first_needed(seq.num_computed)  # the next query sees back to here
        table = seq.tables[g]
        for i in range(min(first // bs, len(table))):
            if table[i] is not None:
                group.allocator.release(table[i])
                table[i] = None

    def _take_cached_prefix(self, seq: Sequence) -> None:
        """Start a new sequence on the blocks the prefix cache holds for its prompt (never the
        whole prompt: the last token is always computed, its logits are needed)."""
        if not self.prefix_caching:
            return
        bs = self.pool.block_size
        hashes, parent = [], None
        for i in range((len(seq.prompt_ids) - 1) // bs):
            parent = block_hash(parent, tuple(seq.prompt_ids[i * bs:(i + 1) * bs]))
            hashes.append(parent)
        matched = 0  # full blocks found in every group that needs them
        for m in range(len(hashes), 0, -1):
            if all(self._cached_blocks(g, hashes, m) is not None for g in range(len(self.pool.groups))):
                matched = m
                break
        if not matched:
            return
        for g in range(len(self.pool.groups)):
            table = self._cached_blocks(g, hashes, matched)
            for block in table:
                if block is not None:
                    self.pool.groups[g].allocator.share(block)
            seq.tables[g] = table
        seq.hashes = hashes[:matched]
        seq.num_computed = seq.cached_tokens = matched * bs

    def _cached_blocks(self, g: int, hashes: list[int], m: int) -> list[int | None] | None:
        """The group's table for the first m cached blocks, None where a window lets a block go;
        None overall if a needed block is not cached."""
        group, bs = self.pool.groups[g], self.pool.block_size
        first = group.first_needed(m * bs) // bs  # blocks before this one are out of the window
        table = []
        for i in range(m):
            block = group.allocator.lookup(hashes[i]) if i >= first else None
            if i >= first and block is None:
                return None
            table.append(block)
        return table

    def release_past_end(self, seq: Sequence) -> None:
        """Give back the blocks past a sequence's last token: after a speculative step they held
        only guesses that were rejected. (Such blocks were never registered: only full blocks of
        computed, accepted tokens are.)"""
        keep = -(-seq.num_tokens // self.pool.block_size)
        for g, group in enumerate(self.pool.groups):
            table = seq.tables[g]
            while len(table) > keep:
                block = table.pop()
                if block is not None:
                    group.allocator.release(block)

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: give newly completed blocks their prefix hash, so later requests find them."""
        if not self.prefix_caching:
            return
        bs, ids = self.pool.block_size, seq.all_ids
        while (len(seq.hashes) + 1) * bs <= seq.num_computed:
            i = len(seq.hashes)
            h = block_hash(seq.hashes[-1] if seq.hashes else None, tuple(ids[i * bs:(i + 1) * bs]))
            seq.hashes.append(h)
            for g, group in enumerate(self.pool.groups):
                if i < len(seq.tables[g]) and seq.tables[g][i] is not None:
                    group.allocator.register(seq.tables[g][i], h)

    # ---- preemption, swapping, finishing ------------------------------------------------------

    def preempt(self, seq: Sequence) -> None:
        self.preemptions += 1
        self.running.remove(seq)
        seq.draft_ids = []  # it resumes by prefilling or from swap, not by verifying these
        if self.preempt_mode == "swap":
            self.swap_out(seq)
            self.swapped.appendleft(seq)
        else:
            self._free(seq)
            seq.num_computed, seq.hashes = 0, []
            seq.status = Status.WAITING
            self.waiting.appendleft(seq)

    def swap_out(self, seq: Sequence) -> None:
        """Move a sequence's blocks to CPU memory (preemption, or a paused conversation)."""
        seq.swapped = []
        for g, group in enumerate(self.pool.groups):
            live = [(i, b) for i, b in enumerate(seq.tables[g]) if b is not None]
            data = self.pool.copy_blocks_out(g, [b for _, b in live]) if live else []
            seq.swapped.append(([i for i, _ in live], len(seq.tables[g]), data))
        self._free(seq)
        seq.status = Status.SWAPPED

    def _swap_in(self, seq: Sequence) -> bool:
        needed = [len(positions) for positions, _, _ in seq.swapped]
        if any(self.pool.groups[g].allocator.available < k for g, k in enumerate(needed)):
            return False
        for g, (positions, length, data) in enumerate(seq.swapped):
            table: list[int | None] = [None] * length
            blocks = [self.pool.groups[g].allocator.allocate() for _ in positions]
            for i, b in zip(positions, blocks):
                table[i] = b
            if blocks:
                self.pool.copy_blocks_in(g, blocks, data)
            seq.tables[g] = table
        seq.swapped, seq.status = None, Status.RUNNING
        self.running.append(seq)
        return True

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence from every queue and free its blocks (finished or cancelled)."""
        if seq in self.running:
            self.running.remove(seq)
        for queue in (self.waiting, self.swapped):
            if seq in queue:
                queue.remove(seq)
        self._free(seq)
        seq.swapped = None
        seq.status = Status.FINISHED

    def _free(self, seq: Sequence) -> None:
        # tables is [] for a sample never queued (n > 1 samples held back, then cancelled)
        for group, table in zip(self.pool.groups, seq.tables):
            for block in table:
                if block is not None:
                    group.allocator.release(block)
        seq.tables = [[] for _ in self.pool.groups]
