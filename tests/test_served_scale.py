"""Online calibration: the profile rescaled to measured batch times."""

import pytest

from niyama.engine.served_scale import ServedScale
from niyama.predictor import BatchShape
from tests.conftest import linear_predictor

SHAPES = [BatchShape(256, 4, 400, 256), BatchShape(0, 16, 3000, 0), BatchShape(96, 0, 0, 96)]


def feed(scale: ServedScale, factor: float, n: int) -> list:
    """n batches that each ran ``factor`` times their profiled time; the rescaled predictors returned."""
    out = []
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        out.append(scale.observe(shape, factor * scale.profile.predict_shape(shape)))
    return out


def test_profile_is_rescaled_to_the_measured_ratio():
    profile = linear_predictor(0.01, 1e-4)
    scale = ServedScale(profile, window=50, every=10)
    updates = feed(scale, 1.6, 10)
    assert updates[:9] == [None] * 9 and updates[9] is not None
    assert scale.scale == pytest.approx(1.6)
    assert updates[9].predict(300, 0) == pytest.approx(1.6 * profile.predict(300, 0))


def test_small_moves_keep_the_predictor_and_the_window_follows_the_hardware():
    scale = ServedScale(linear_predictor(0.01, 1e-4), window=20, every=10, min_change=0.05)
    feed(scale, 2.0, 10)
    assert feed(scale, 2.05, 10) == [None] * 10  # ratio 2.0–2.05: within 5%
    assert scale.scale == pytest.approx(2.0)
    updates = feed(scale, 1.0, 20)  # the machine got faster: the old ratios leave the window
    assert updates[-1] is not None and scale.scale == pytest.approx(1.0)


def test_a_few_very_slow_batches_count_by_the_time_they_cost():
    # Nine batches on time and one six times slower: a median would say 1.0; the time lost says 1.5.
    profile = linear_predictor(0.1, 0.0)  # every batch predicted 0.1 s
    scale = ServedScale(profile, window=10, every=10)
    for i in range(10):
        scale.observe(SHAPES[0], 0.6 if i == 4 else 0.1)
    assert scale.scale == pytest.approx(1.5)
