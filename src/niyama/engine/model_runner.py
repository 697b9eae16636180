"""Executes one batch: builds the flattened inputs and attention metadata, runs the model, samples.

The runner reads request progress (``num_computed_tokens``, tokens, block tables) but never changes
it: the caller (scheduler or offline loop) advances requests after ``execute`` returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from niyama.engine.attention import AttentionMetadata, DecodeBatch, DecodeGroup, PrefillChunk
from niyama.engine.config import EngineConfig, ModelConfig, resolve_dtype
from niyama.engine.kv_cache import KVCache, num_kv_blocks
from niyama.engine.model import LlamaModel
from niyama.engine.sampler import GREEDY, Sampler, SamplingParams
from niyama.engine.weights import load_weights
from niyama.request import Request

Chunk = tuple[Request, int]

# A decode joins the current attention group (padded to the group's longest context) unless it is both
# much shorter than that context and shorter by more than a group's fixed cost in padded positions.
GROUP_RATIO = 0.7
GROUP_MIN_GAP = 256


def decode_groups(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges over context ``lengths`` sorted longest first."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i, n in enumerate(lengths):
        longest = lengths[start]
        if n < GROUP_RATIO * longest and longest - n > GROUP_MIN_GAP:
            groups.append((start, i))
            start = i
    if lengths:
        groups.append((start, len(lengths)))
    return groups


@dataclass(slots=True)
class PreparedBatch:
    """Model inputs for one iteration. Rows are ordered single-token chunks first."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # rows whose logits are sampled
    samplers: list[Request]  # the request of each sampled row


class ModelRunner:
    def __init__(self, config: ModelConfig, state: dict[str, torch.Tensor], *, dtype: torch.dtype,
                 device: torch.device | str = "cpu", num_blocks: int, block_size: int = 16,
                 native_kernels: bool = True, quantized: bool = True):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.block_size = block_size
        self.model = LlamaModel(config, state, dtype, self.device, native_kernels, quantized)
        self.kv_cache = KVCache(config, num_blocks, block_size, dtype, self.device)
        self.sampler = Sampler(self.model.kernels.argmax if self.model.kernels is not None else None)
        self.last_logprobs: dict[str, float] = {}  # filled by execute for requests that asked for them

    @classmethod
    def from_config(cls, engine: EngineConfig) -> ModelRunner:
        if engine.num_threads:
            torch.set_num_threads(engine.num_threads)
        device = engine.torch_device()
        dtype = resolve_dtype(engine.dtype, device)
        config, state = load_weights(engine.model)
        blocks = num_kv_blocks(config, dtype, engine.kv_cache_memory, engine.block_size)
        return cls(config, state, dtype=dtype, device=device, num_blocks=blocks, block_size=engine.block_size,
                   native_kernels=engine.native_kernels, quantized=engine.quantized)

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

    def release(self, request_id: str) -> None:
        """Forget per-request sampler state (call when a request finishes or is aborted)."""
        self.sampler.release(request_id)

    @torch.inference_mode()
    def execute(self, chunks: Sequence[Chunk],
                sampling: Mapping[str, SamplingParams] | None = None) -> dict[str, int]:
        """Run one iteration; returns request_id -> sampled token for chunks that reach the end of their
        known tokens. Requests missing from ``sampling`` are sampled greedily."""
        self.last_logprobs = {}
        if not chunks:
            return {}
        batch = self.prepare(chunks)
        hidden = self.model.forward(batch.input_ids, batch.positions, batch.meta, self.kv_cache)
        if not batch.samplers:
            return {}
        logits = self.model.logits(hidden[batch.sample_rows])
        sampling = sampling or {}
        params = [sampling.get(r.request_id, GREEDY) for r in batch.samplers]
        ids = [r.request_id for r in batch.samplers]
        tokens, logprobs = self.sampler(logits, ids, params)
        if logprobs is not None:
            self.last_logprobs = {rid: lp for rid, lp, p in zip(ids, logprobs, params, strict=True) if p.logprobs}
        return dict(zip(ids, tokens, strict=True))

    def prepare(self, chunks: Sequence[Chunk]) -> PreparedBatch:
        """Flattened token ids, positions, attention metadata and the rows/requests that sample."""
        decodes = sorted((c for c in chunks if c[1] == 1), key=lambda c: -c[0].num_computed_tokens)
        chunks = decodes + [c for c in chunks if c[1] > 1]
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        sample_rows: list[int] = []
        samplers: list[Request] = []
        decode_tables: list[list[int]] = []
        decode_lengths: list[int] = []
        prefills: list[PrefillChunk] = []
        for r, n in chunks:
            start, end = r.num_computed_tokens, r.num_computed_tokens + n
            if end > r.num_tokens or -(-end // bs) > len(r.block_ids):
                raise ValueError(f"request {r.request_id}: chunk [{start}, {end}) exceeds its tokens/blocks")
            row = len(input_ids)
            input_ids += r.token_ids(start, end)
            positions += range(start, end)
            table = r.block_ids
            slot_blocks += [table[p // bs] for p in range(start, end)]
            if end == r.num_tokens:
                sample_rows.append(row + n - 1)
                samplers.append(r)
            if n == 1:
                decode_tables.append(table[:-(-end // bs)])
                decode_lengths.append(end)
            elif start == 0:
                prefills.append(PrefillChunk(row, n, None, None))
            else:
                blocks = torch.tensor(table[:-(-end // bs)], device=self.device)
                mask = (torch.arange(end, device=self.device)[None, :]
                        <= torch.arange(start, end, device=self.device)[:, None])
                prefills.append(PrefillChunk(row, n, blocks, mask))
        pos = torch.tensor(positions, device=self.device)
        meta = AttentionMetadata(
            slot_blocks=torch.tensor(slot_blocks, device=self.device),
            slot_offsets=pos % bs,
            decodes=self._decodes(decode_tables, decode_lengths),
            prefills=prefills,
        )
        return PreparedBatch(torch.tensor(input_ids, device=self.device), pos, meta,
                             torch.tensor(sample_rows, device=self.device), samplers)

    def _decodes(self, tables: list[list[int]], lengths: list[int]) -> list[DecodeGroup] | DecodeBatch:
        """Attention metadata of the single-token chunks: one batch for the native kernel, else groups."""
        if self.model.kernels is None:
            return [self._decode_group(start, tables[start:stop], lengths[start:stop])
                    for start, stop in decode_groups(lengths)]
        width = max((len(t) for t in tables), default=0)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32).view(len(tables), width)
        return DecodeBatch(padded, torch.tensor(lengths, dtype=torch.int32))

    def _decode_group(self, row: int, tables: list[list[int]], lengths: list[int]) -> DecodeGroup:
        """Padded block tables and length mask of single-token chunks attending together."""
        width = max(len(t) for t in tables)
        blocks = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=self.device).flatten()
        slots = width * self.block_size
        mask = torch.arange(slots, device=self.device)[None, :] < torch.tensor(lengths, device=self.device)[:, None]
        return DecodeGroup(row, len(tables), blocks, mask.view(len(tables), 1, 1, slots))
