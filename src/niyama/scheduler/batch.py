"""What the scheduler hands to the engine (or the simulator) for one iteration."""

from __future__ import annotations

from dataclasses import dataclass, field

from niyama.predictor import BatchShape
from niyama.request import Request


@dataclass(slots=True)
class Batch:
    """Decode tokens first, then prefill chunks.

    Each chunk ``(request, n)`` computes the request's tokens ``[num_computed_tokens, +n)``; the KV
    blocks for them are already allocated in ``request.block_ids``. A request whose chunk reaches the
    end of its known tokens (``samples``) gets one new token sampled.
    """

    decodes: list[Request] = field(default_factory=list)
    prefills: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)  # freed this iteration, for the engine's info
    _shape: BatchShape | None = field(default=None, repr=False, compare=False)

    @property
    def chunks(self) -> list[tuple[Request, int]]:
        return [(r, 1) for r in self.decodes] + self.prefills

    @property
    def num_prefill_tokens(self) -> int:
        return sum(n for _, n in self.prefills)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + self.num_prefill_tokens

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)

    def shape(self) -> BatchShape:
        """The predictor's features of the batch as scheduled. Computed once, on the first call after the
        scheduler has built the batch (the scheduler, the engine and the simulator all ask), so it stays
        the scheduled shape after ``update()`` has advanced the requests."""
        if self._shape is None:
            self._shape = BatchShape(
                num_prefill_tokens=self.num_prefill_tokens,
                num_decode_tokens=len(self.decodes),
                decode_ctx=sum(r.num_computed_tokens + 1 for r in self.decodes),
                prefill_ctx=sum(r.num_computed_tokens + n for r, n in self.prefills),
            )
        return self._shape


def samples(request: Request, num_new_tokens: int) -> bool:
    """Whether computing ``num_new_tokens`` more tokens reaches the end, so a token is sampled."""
    return request.num_computed_tokens + num_new_tokens == request.num_tokens
