"""Batch-time predictor: one iteration's execution time from the batch's shape (DESIGN.md §2).

Linear models stratified by the batch's total tokens (bins split at ``splits``; the reference has two, split
at 512), over five features: total tokens, prefill tokens, decode tokens, sum of decode context lengths,
sum of prefill context lengths (one context length per request: the tokens it attends to at the end of
its chunk). An engine whose kernels change at some other batch size (the CPU engine's smallest batches
read bf16 weights, larger ones float32 copies) gets a bin boundary there too. Fitted by weighted
non-negative least squares on relative error from profiling rows; saved as JSON. The simulator uses a
predictor as its latency model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

FEATURES = ("intercept", "tokens", "prefill", "decode", "decode_ctx", "prefill_ctx")
MIN_PROFILE_ROWS = len(FEATURES)  # a fit needs at least one timed batch per coefficient
MIN_PROFILE_BATCHES = MIN_PROFILE_ROWS + 2  # and a profile two more, held out to measure the fit's error
DEFAULT_SPLIT = 512  # the reference's boundary between small and large batches (total tokens)
FIT_VERSION = 2  # raised when fitting changes, so that profiles calibrated and cached by an older fit are redone


@dataclass(frozen=True, slots=True)
class BatchShape:
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    decode_ctx: int = 0  # sum over decodes of their context length
    prefill_ctx: int = 0  # sum over prefill chunks of the context length at the chunk's end

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    def features(self) -> list[float]:
        return [1.0, self.num_tokens, self.num_prefill_tokens, self.num_decode_tokens,
                self.decode_ctx, self.prefill_ctx]


class BatchTimePredictor:
    """``bins[i]`` holds the coefficients for batches of at most ``splits[i]`` total tokens (and more than
    the previous split); the last bin serves everything above the last split."""

    def __init__(self, bins: Sequence[Sequence[float]], splits: Sequence[int] = (DEFAULT_SPLIT,),
                 meta: dict[str, Any] | None = None):
        if len(bins) != len(splits) + 1:
            raise ValueError(f"{len(splits)} split(s) need {len(splits) + 1} bins of coefficients")
        if any(a >= b for a, b in pairwise(splits)) or (splits and splits[0] < 1):
            raise ValueError(f"bin splits must be increasing positive token counts, not {list(splits)}")
        if any(len(c) != len(FEATURES) for c in bins):
            raise ValueError(f"each bin needs {len(FEATURES)} coefficients ({', '.join(FEATURES)})")
        self.bins = tuple(tuple(float(c) for c in coefs) for coefs in bins)
        if not all(math.isfinite(c) for coefs in self.bins for c in coefs):
            raise ValueError("batch-time coefficients must be finite numbers")
        if any(max(coefs) <= 0 for coefs in self.bins):  # the features are never negative
            raise ValueError("a bin of batch-time coefficients has none above 0: it would price every batch at 0 s")
        self.splits = tuple(int(s) for s in splits)
        self._bounded = tuple(zip(self.splits, self.bins[:-1], strict=True))
        self.meta = dict(meta or {})

    def predict(self, prefill: int, decode: int, decode_ctx: int = 0, prefill_ctx: int = 0) -> float:
        """Predicted seconds for one iteration (hot path: plain floats, no numpy)."""
        tokens = prefill + decode
        c = self.bins[-1]
        for bound, coefs in self._bounded:
            if tokens <= bound:
                c = coefs
                break
        t = c[0] + c[1] * tokens + c[2] * prefill + c[3] * decode + c[4] * decode_ctx + c[5] * prefill_ctx
        return t if t > 1e-6 else 1e-6

    def predict_shape(self, shape: BatchShape) -> float:
        return self.predict(shape.num_prefill_tokens, shape.num_decode_tokens, shape.decode_ctx,
                            shape.prefill_ctx)

    def scaled(self, factor: float) -> BatchTimePredictor:
        """The same model on hardware ``factor`` times slower: every coefficient multiplied."""
        meta = {**self.meta, "scale": self.meta.get("scale", 1.0) * factor}
        return BatchTimePredictor([[c * factor for c in coefs] for coefs in self.bins], self.splits, meta)

    # -- fitting -------------------------------------------------------------------------------
    @classmethod
    def fit(cls, shapes: Sequence[BatchShape], times: Sequence[float], splits: Sequence[int] = (DEFAULT_SPLIT,),
            meta: dict[str, Any] | None = None) -> BatchTimePredictor:
        """Fit of each bin (``_relative_nnls``); a bin with no more rows than the coefficients its rows can
        determine (their features' rank: decode steps alone determine three, the costs per batch, per token
        and per context token) borrows the fit of the nearest bin that has enough (the next larger one first)."""
        x = np.array([s.features() for s in shapes], dtype=float)
        y = np.asarray(times, dtype=float)
        if len(y) != len(x) or len(y) < MIN_PROFILE_ROWS:
            raise ValueError(f"need at least {MIN_PROFILE_ROWS} profile rows with one time each")
        which = np.searchsorted(np.asarray(splits), x[:, 1], side="left")  # bin index of each row
        fitted = {i: _relative_nnls(x[which == i], y[which == i])
                  for i in range(len(splits) + 1) if (which == i).sum() > np.linalg.matrix_rank(x[which == i])}
        if not fitted:
            return cls([_relative_nnls(x, y)] * (len(splits) + 1), splits, meta)
        nearest = [min(fitted, key=lambda j, i=i: (abs(j - i), j < i)) for i in range(len(splits) + 1)]
        return cls([fitted[j] for j in nearest], splits, meta)

    def mape(self, shapes: Sequence[BatchShape], times: Sequence[float]) -> float:
        """Mean absolute percentage error (a fraction: 0.05 = 5%)."""
        errors = [abs(self.predict_shape(s) - t) / t for s, t in zip(shapes, times, strict=True)]
        return float(np.mean(errors))

    # -- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"features": list(FEATURES), "splits": list(self.splits), "bins": [list(c) for c in self.bins],
                "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchTimePredictor:
        if list(data.get("features", FEATURES)) != list(FEATURES):
            raise ValueError("profile features do not match this version's feature set")
        if "bins" in data:
            return cls(data["bins"], data["splits"], data.get("meta"))
        # Profiles saved before bins were generalized: two bins named small and large.
        return cls([data["small"], data["large"]], [int(data.get("split", DEFAULT_SPLIT))], data.get("meta"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, name_or_path: str | Path) -> BatchTimePredictor:
        """Load a JSON profile by path, or a built-in one by name (see ``builtin_profiles``)."""
        path = Path(name_or_path)
        if path.suffix != ".json" and str(name_or_path) in builtin_profiles():
            text = resources.files("niyama").joinpath(f"profiles/{name_or_path}.json").read_text()
        else:
            try:
                text = path.read_text()
            except OSError as e:
                known = ", ".join(builtin_profiles())
                raise ValueError(f"cannot read profile {name_or_path} ({e.strerror}); "
                                 f"built-in profiles: {known}") from None
        try:
            return cls.from_dict(json.loads(text))
        except (ValueError, AttributeError, KeyError, TypeError, IndexError) as e:
            raise ValueError(f"{name_or_path} is not a batch-time profile ({type(e).__name__}: {e})") from None


_PER_KIND = [FEATURES.index(f) for f in ("intercept", "prefill", "decode", "decode_ctx", "prefill_ctx")]
_PER_TOKEN = [FEATURES.index(f) for f in ("intercept", "tokens", "decode_ctx", "prefill_ctx")]


def _relative_nnls(x: np.ndarray, y: np.ndarray, rounds: int = 4) -> np.ndarray:
    """Least squares on relative error, every cost non-negative: each row weighted by 1 / its predicted
    time, refitted a few times (weights from the measured times instead would bias the fit low). A plain
    fit lets the slowest batches dominate: the model is only approximately linear, and a 0.1 s decode step
    then comes out tens of percent off to fit a 1 s prefill a little better.

    Without the bounds, a small or noisy profile (a few dozen batches on a busy machine, as at a server's
    start-up) can trade correlated terms against each other: a negative cost per prefill token paid back
    by the context term priced every prefill chunk at nothing. An iteration never gets faster by holding
    more tokens, so no cost may be negative.

    ``tokens`` is the sum of the prefill and decode tokens, so a cost per token of each kind makes it
    redundant and the fit leaves it 0; but where the rows hold only one kind (a bin of decode steps), a
    token of the other kind is priced like it, through ``tokens``."""
    from scipy.optimize import nnls  # here: only fitting needs scipy, which takes 0.3 s to import

    both_kinds = x[:, FEATURES.index("prefill")].any() and x[:, FEATURES.index("decode")].any()
    fitted = _PER_KIND if both_kinds else _PER_TOKEN
    z = x[:, fitted]
    scale = np.abs(z).max(axis=0)
    scale[scale == 0] = 1.0
    z = z / scale  # columns of one magnitude: the intercept is 1, context sums run to 10^5
    weights = np.ones_like(y)
    floor = max(float(y.min()), 1e-6)
    for _ in range(rounds):
        solved = nnls(z * weights[:, None], y * weights)[0]
        weights = 1.0 / np.maximum(z @ solved, floor)
    coefs = np.zeros(x.shape[1])
    coefs[fitted] = solved / scale
    return coefs


def builtin_profiles() -> list[str]:
    folder = resources.files("niyama").joinpath("profiles")
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))
