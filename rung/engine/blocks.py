"""Fixed-size KV blocks: an allocator with reference counts and a prefix cache.

A block holds ``block_size`` consecutive positions of one sequence. A full block whose tokens are
all computed gets a hash of its tokens and of everything before it (its parent's hash), and is
registered under it: another request with the same prefix takes the block (reference count + 1)
instead of computing it again. A block nobody references but that still has a hash stays
findable in a least-recently-used list, and is evicted only when free blocks run out.
"""

from __future__ import annotations

from collections import OrderedDict


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class OutOfBlocks(RuntimeError):
    """No free or evictable block is left (the scheduler preempts and retries)."""


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # never used, or evicted
        self.cached: OrderedDict[int, None] = OrderedDict()  # ref 0 but registered: LRU first
        self.by_hash: dict[int, int] = {}

    # ---- counting -----------------------------------------------------------------------------

    @property
    def available(self) -> int:
        """Blocks an allocation could take now (free, or cached and evictable)."""
        return len(self.free) + len(self.cached)

    @property
    def in_use(self) -> int:
        return self.num_blocks - self.available

    # ---- allocation ---------------------------------------------------------------------------

    def allocate(self) -> int:
        if self.free:
            block = self.free.pop()
        elif self.cached:
            block, _ = self.cached.popitem(last=False)  # evict the least recently used
            del self.by_hash[self.hash_of[block]]
            self.hash_of[block] = None
        else:
            raise OutOfBlocks("no free KV blocks")
        self.refs[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more owner of a block (a prefix-cache hit, or a fork)."""
        if self.refs[block] == 0:
            self.cached.pop(block, None)
        self.refs[block] += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] < 0:
            raise AssertionError(f"block {block} released more often than taken")
        if self.refs[block] == 0:
            if self.hash_of[block] is None:
                self.free.append(block)
            else:
                self.cached[block] = None  # most recently used at the end

    # ---- prefix cache -------------------------------------------------------------------------

    def register(self, block: int, h: int) -> None:
        """Record that ``block`` holds the full block with hash ``h``."""
        if self.hash_of[block] is not None or h in self.by_hash:
            return  # already registered, or an identical block is (this one stays private)
        self.hash_of[block], self.by_hash[h] = h, block

    def lookup(self, h: int) -> int | None:
        return self.by_hash.get(h)

    def reset_prefix_cache(self) -> None:
        for block in list(self.cached):
            self.cached.pop(block)
            self.free.append(block)
        for block, h in enumerate(self.hash_of):
            if h is not None and self.refs[block] == 0:
                self.hash_of[block] = None
        self.by_hash = {h: b for b, h in enumerate(self.hash_of) if h is not None}
