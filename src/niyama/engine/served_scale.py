"""Online calibration: the profiled batch-time predictor, scaled to the batch times measured while serving.

A profile is measured with the engine alone. Serving adds the HTTP server, tokenization and, on a small
machine, often the clients themselves on the same cores, so every iteration can run tens of percent slower
than profiled. Niyama's decisions (dynamic chunk size, relegation) rest on predicted batch times, so the
engine tracks measured / predicted over recent iterations and hands the scheduler the profile scaled by
the median ratio whenever it moves.
"""

from __future__ import annotations

import statistics
from collections import deque

from niyama.predictor import BatchShape, BatchTimePredictor


class ServedScale:
    def __init__(self, profile: BatchTimePredictor, window: int = 500, every: int = 100, min_change: float = 0.05):
        self.profile = profile
        self.scale = 1.0
        self._ratios: deque[float] = deque(maxlen=window)
        self._every = every
        self._min_change = min_change
        self._since_update = 0

    def observe(self, shape: BatchShape, seconds: float) -> BatchTimePredictor | None:
        """Record one executed batch; every ``every`` batches, return the rescaled profile if the median
        ratio moved by more than ``min_change`` (else None)."""
        self._ratios.append(seconds / self.profile.predict_shape(shape))
        self._since_update += 1
        if self._since_update < self._every:
            return None
        self._since_update = 0
        scale = statistics.median(self._ratios)
        if abs(scale / self.scale - 1) <= self._min_change:
            return None
        self.scale = scale
        return self.profile.scaled(scale)
