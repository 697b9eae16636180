"""Profile the engine on a grid of batch shapes and fit the batch-time predictor (DESIGN.md §2).

Each profiled batch is a random mix of decodes (with random context lengths) and prefill chunks
(fresh prompts or continuations of partly prefilled ones). One batch is timed end to end through
``ModelRunner.execute`` (input preparation, forward pass, sampling), as the live engine loop runs it.
All batches are built first and timed in rounds, each round running every batch once: on a shared
machine whose speed drifts, repeats spread over the whole profile average the drift out, where
back-to-back repeats would all catch the same slow spell.
"""

from __future__ import annotations

import json
import math
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from niyama.engine.config import BF16_CPU_FLAGS, cpu_info
from niyama.engine.model_runner import ModelRunner
from niyama.memory import KVBlockManager
from niyama.predictor import DEFAULT_SPLIT, MIN_PROFILE_BATCHES, MIN_PROFILE_ROWS, BatchShape, BatchTimePredictor
from niyama.qos import QoS
from niyama.request import Request
from niyama.scheduler.batch import Batch

_QOS = QoS(name="profile", ttlt=3600.0)
DECODE_COUNTS = (0, 1, 2, 4, 8, 16, 32, 64, 128)  # up to `niyama serve`'s running requests
CHUNK_SIZES = (8, 32, 64, 128, 256, 512, 1024, 2048)
TINY_EVERY = 3  # with a small-batch path, one profiled batch in this many is that small


@dataclass(slots=True)
class ProfileResult:
    shapes: list[BatchShape]
    times: list[float]
    splits: tuple[int, ...] = (DEFAULT_SPLIT,)  # the predictor's bins for the engine measured


def predictor_splits(runner: ModelRunner) -> tuple[int, ...]:
    """The predictor's bin boundaries for this engine: the reference's, and one where its kernels change."""
    small = runner.model.small_batch_rows
    return (DEFAULT_SPLIT,) if small is None else (small, DEFAULT_SPLIT)


def random_batch(rng: random.Random, kv: KVBlockManager, vocab: int, max_tokens: int, max_context: int,
                 ids: list[int], tiny: int = 0) -> Batch:
    """A random mixed batch whose requests hold freshly allocated KV blocks (contents do not matter);
    with ``tiny``, a decode step of at most that many requests."""

    def request(context: int, new: int, decode: bool) -> Request:
        """A request with ``context`` tokens already 'cached' and ``new`` to compute."""
        ids[0] += 1
        total = context + new
        prompt = total - 1 if decode else total
        r = Request(f"p{ids[0]}", 0.0, _QOS, prompt, 1 << 20, [rng.randrange(vocab) for _ in range(prompt)])
        if decode:
            r.output_token_ids.append(rng.randrange(vocab))
        kv.allocate(r, total)  # blocks for positions [0, total)
        r.num_computed_tokens = context
        return r

    batch = Batch()
    if tiny:  # decode steps of a lightly loaded server (a prompt's few-token tail chunk is rare)
        num_decodes = rng.randint(1, tiny)
    else:
        max_tokens = int(2 ** rng.uniform(3, math.log2(max_tokens)))  # log-uniform: fill both predictor bins
        num_decodes = min(rng.choice(DECODE_COUNTS), max_tokens)
    max_context = max(min(max_context, kv.capacity_tokens // (num_decodes + 4) - 1), 2)  # all must fit
    for _ in range(num_decodes):
        batch.decodes.append(request(rng.randint(1, max_context - 1), 1, decode=True))
    if tiny:
        return batch
    budget = max_tokens - len(batch.decodes)
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        sizes = [s for s in CHUNK_SIZES if s <= min(budget, max_context)]
        if not sizes:
            break
        n = rng.choice(sizes)
        prior = rng.choice((0, 0, rng.randint(1, max(max_context - n, 1))))
        batch.prefills.append((request(prior, n, decode=False), n))
        budget -= n
    if not batch:
        batch.prefills.append((request(0, CHUNK_SIZES[0], decode=False), CHUNK_SIZES[0]))
    return batch


def profile(runner: ModelRunner, num_batches: int = 80, max_tokens: int = 1024, max_context: int = 2048,
            repeats: int = 3, seed: int = 0, progress: Callable[[int, int], None] | None = None) -> ProfileResult:
    """Time ``num_batches`` random batches (median of ``repeats`` rounds). Where the engine has a small-batch
    path, one batch in ``TINY_EVERY`` is that small, so that the predictor's bin for it has rows to fit."""
    rng = random.Random(seed)
    vocab = runner.config.vocab_size
    max_context = min(max_context, runner.config.context_length)
    tiny = runner.model.small_batch_rows or 0
    ids = [0]

    def batch(i: int, max_tokens: int, max_context: int) -> Batch:
        kv = KVBlockManager(runner.num_blocks, runner.block_size)  # each batch its own blocks table
        return random_batch(rng, kv, vocab, max_tokens, max_context, ids, tiny if i % TINY_EVERY == 1 else 0)

    runner.execute(batch(0, 64, 256).chunks)  # warm-up
    batches = [batch(i, max_tokens, max_context) for i in range(num_batches)]
    samples: list[list[float]] = [[] for _ in batches]
    for r in range(repeats):
        for i, b in enumerate(batches):
            start = time.perf_counter()
            runner.execute(b.chunks)
            samples[i].append(time.perf_counter() - start)
            if progress:
                progress(r * num_batches + i + 1, repeats * num_batches)
    return ProfileResult([b.shape() for b in batches], [statistics.median(t) for t in samples],
                         predictor_splits(runner))


def runner_meta(runner: ModelRunner, model_name: str) -> dict[str, Any]:
    """What a profile records about the engine it was measured on."""
    return {
        "hardware": hardware_name(runner.device),
        "model": model_name,
        "dtype": str(runner.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "native_kernels": runner.model.kernels is not None,
        "quantized": runner.model.quantized,
        "block_size": runner.block_size,
        "kv_cache_tokens": runner.kv_cache.capacity_tokens,
    }


LOG_FIELDS = tuple(f.name for f in fields(BatchShape))  # as ``EngineCore`` logs them (``asdict(shape)``)


def read_iteration_log(path: str | Path) -> ProfileResult:
    """The rows of a server's iteration log (``niyama serve --iteration-log``): shapes and times. A row that
    is not one (a missing field, a value that is not a number >= 0, a time that is not > 0) is a ValueError
    naming its line."""
    shapes, times = [], []
    with Path(path).open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                values = [row[k] for k in (*LOG_FIELDS, "seconds")]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"line {number}: not an iteration ({type(e).__name__}: {e})") from None
            if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                       for v in values) or values[-1] == 0:
                raise ValueError(f"line {number}: batch sizes must be numbers >= 0 and seconds > 0, got {line.strip()}")
            shapes.append(BatchShape(*values[:-1]))
            times.append(values[-1])
    if not times:
        raise ValueError("no iterations in it")
    return ProfileResult(shapes, times)


def fit(result: ProfileResult, meta: dict[str, Any], holdout: float = 0.25,
        seed: int = 0) -> tuple[BatchTimePredictor, float]:
    """Fit on a random train split; returns the predictor and its MAPE on the held-out rows (a ``holdout``
    share, at least two)."""
    order = list(range(len(result.times)))
    if len(order) < MIN_PROFILE_BATCHES:
        raise ValueError(f"{len(order)} timed batches; a profile needs at least {MIN_PROFILE_BATCHES} "
                         f"({MIN_PROFILE_ROWS} to fit, the rest held out to measure its error)")
    random.Random(seed).shuffle(order)
    cut = min(max(int(len(order) * (1 - holdout)), MIN_PROFILE_ROWS), len(order) - 2)
    train, test = order[:cut], order[cut:]
    meta = {**meta, "num_profile_batches": len(order), "date": time.strftime("%Y-%m-%d")}
    predictor = BatchTimePredictor.fit([result.shapes[i] for i in train], [result.times[i] for i in train],
                                       result.splits, meta)
    mape = predictor.mape([result.shapes[i] for i in test], [result.times[i] for i in test])
    predictor.meta["heldout_mape"] = round(mape, 4)
    return predictor, mape


def hardware_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name with its vector ISA and bf16 support and the thread count.
    The same VM model name has come with AVX2 only on one day and AVX512-BF16 on another, with 3-4x
    different batch times: a cached profile must not carry over between them."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = cpu_info()
    name = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    bf16 = [label for flag, label in BF16_CPU_FLAGS.items() if flag in flags]
    features = [torch.backends.cpu.get_cpu_capability(), *bf16]
    return f"{name} ({', '.join(features)}; {torch.get_num_threads()} threads)"
