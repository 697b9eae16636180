"""KV-cache block accounting: which physical blocks each request holds.

The engine's paged KV cache stores token ``i`` of a request in block ``request.block_ids[i // block_size]``
at offset ``i % block_size``; this module decides those block ids. The scheduler asks it before it puts
tokens in a batch, so the engine never runs out of KV memory mid-iteration.
"""

from __future__ import annotations

from niyama.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVBlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, watermark: float = 0.01):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_blocks)
        # A stack: recently freed blocks are reused first (they are warm in cache).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        total = cdiv(request.num_computed_tokens + num_new_tokens, self.block_size)
        return max(total - len(request.block_ids), 0)

    def can_allocate(self, request: Request, num_new_tokens: int, *, admit: bool = False) -> bool:
        """Whether ``num_new_tokens`` more tokens fit. ``admit=True`` (a request that holds no blocks
        yet) also keeps the watermark free, so that running decodes can still grow."""
        reserve = self.watermark_blocks if admit else 0
        return self.blocks_needed(request, num_new_tokens) <= len(self._free) - reserve

    def max_new_tokens(self, request: Request, *, admit: bool = False) -> int:
        """The most new tokens this request could be given now."""
        reserve = self.watermark_blocks if admit else 0
        free_blocks = len(self._free) - reserve
        if free_blocks < 0:
            return 0
        capacity = (len(request.block_ids) + free_blocks) * self.block_size
        return max(capacity - request.num_computed_tokens, 0)

    def allocate(self, request: Request, num_new_tokens: int) -> None:
        """Grow the request's block table to hold ``num_new_tokens`` more tokens."""
        needed = self.blocks_needed(request, num_new_tokens)
        if needed > len(self._free):
            raise MemoryError(f"KV cache exhausted: need {needed} blocks, {len(self._free)} free")
        for _ in range(needed):
            request.block_ids.append(self._free.pop())

    def free(self, request: Request) -> None:
        """Return all of the request's blocks (finish, abort or preemption)."""
        self._free.extend(reversed(request.block_ids))
        request.block_ids = []
