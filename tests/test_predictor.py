import json

import numpy as np
import pytest

from niyama.predictor import BatchShape, BatchTimePredictor, builtin_profiles


def _random_shapes(rng, n, max_tokens):
    shapes = []
    for _ in range(n):
        decode = int(rng.integers(0, 64))
        prefill = int(rng.integers(1, max_tokens))
        shapes.append(BatchShape(prefill, decode, decode * int(rng.integers(1, 4000)),
                                 prefill + int(rng.integers(0, 4000))))
    return shapes


def _costs(coefs):
    """Intercept and costs per prefill token, decode token, decode and prefill context token: ``tokens`` is
    their sum, so its coefficient folds into the prefill and decode costs."""
    return [coefs[0], coefs[1] + coefs[2], coefs[1] + coefs[3], coefs[4], coefs[5]]


def test_fit_recovers_known_coefficients():
    reference = BatchTimePredictor.load("a100-llama3-8b")
    # The reference's large bin prices a decode token at -1.4e-5 s plus its context; a fit keeps costs >= 0,
    # so the truth here has that cost at 0.
    large = list(reference.bins[1])
    large[3] = -large[1]
    truth = BatchTimePredictor([reference.bins[0], large])
    rng = np.random.default_rng(0)
    shapes = _random_shapes(rng, 400, 512) + _random_shapes(rng, 400, 2552)
    times = [truth.predict_shape(s) for s in shapes]
    fitted = BatchTimePredictor.fit(shapes, times)
    for got, want in zip(fitted.bins, truth.bins, strict=True):
        assert np.allclose(_costs(got), _costs(want), rtol=1e-4, atol=1e-9)
    assert fitted.mape(shapes, times) < 1e-6


def test_fit_keeps_every_cost_non_negative():
    """A start-up calibration: a dozen batches, some slowed by other work on the machine. Plain least
    squares then trades correlated terms (a chunk's prefill tokens and its context) against each other and
    can give a negative cost per token, pricing big chunks at nothing; the fit keeps every cost >= 0."""
    truth = BatchTimePredictor([[0.02, 0.0, 2e-4, 1e-4, 1e-6, 1e-5]] * 2)
    rng = np.random.default_rng(4)
    plain_negative = 0
    for _ in range(20):
        shapes = _random_shapes(rng, 12, 512)
        times = [truth.predict_shape(s) * (rng.uniform(1.0, 3.0) if rng.random() < 0.3 else 1.0) for s in shapes]
        x = np.array([s.features() for s in shapes])
        plain = _costs(np.linalg.lstsq(x, np.array(times), rcond=None)[0])
        plain_negative += min(plain) < 0
        fitted = BatchTimePredictor.fit(shapes, times, splits=())
        assert min(_costs(fitted.bins[0])) >= 0
        chunks = [fitted.predict(n, 0, 0, n) for n in (64, 128, 256, 512)]
        assert chunks == sorted(chunks) and chunks[0] > 0
    assert plain_negative >= 10  # the hazard is common, not contrived


def test_fit_with_noise_reports_its_error():
    truth = BatchTimePredictor.load("a100-llama3-8b")
    rng = np.random.default_rng(1)
    shapes = _random_shapes(rng, 600, 2552)
    times = [truth.predict_shape(s) * rng.normal(1.0, 0.05) for s in shapes]
    fitted = BatchTimePredictor.fit(shapes[:400], times[:400])
    assert 0.01 < fitted.mape(shapes[400:], times[400:]) < 0.08


def test_fit_balances_relative_error_when_the_model_is_approximate():
    """Decode steps and prefills whose fixed costs differ, which no linear model over these features fits
    exactly: plain least squares serves the long prefills and leaves the short steps far off; the fit
    weighs every batch by its relative error instead."""
    rng = np.random.default_rng(2)
    steps = [BatchShape(0, int(d)) for d in rng.integers(1, 16, 200)]
    prefills = [BatchShape(int(p), 0) for p in rng.integers(256, 512, 200)]
    shapes = steps + prefills
    times = [(0.03 + 0.004 * s.num_decode_tokens if s.num_decode_tokens else 0.12 + 0.002 * s.num_prefill_tokens)
             * rng.lognormal(0.0, 0.05) for s in shapes]
    fitted = BatchTimePredictor.fit(shapes, times)
    x = np.array([s.features() for s in shapes])
    plain = x @ np.linalg.lstsq(x, np.array(times), rcond=None)[0]
    plain_mape = float(np.mean(np.abs(plain - times) / times))
    assert fitted.mape(shapes, times) < 0.7 * plain_mape
    assert fitted.mape(steps, times[:200]) < 0.5 * float(np.mean(np.abs(plain[:200] - times[:200]) / times[:200]))


def test_fit_gives_a_small_batch_path_its_own_bin():
    """An engine whose smallest batches run other kernels (cheaper per batch, dearer per token): with a
    bin boundary there, each side is fitted exactly; without it, one line is well off for the small ones."""
    rng = np.random.default_rng(3)
    shapes = [BatchShape(0, int(d), int(d) * 500) for d in rng.integers(1, 7, 40)]
    shapes += [BatchShape(0, int(d), int(d) * 500) for d in rng.integers(7, 64, 60)]
    shapes += [BatchShape(int(p), int(d), int(d) * 500, int(p)) for p, d in rng.integers(8, 500, (60, 2))]
    times = [0.035 + 0.008 * s.num_tokens if s.num_tokens <= 6 else 0.1 + 0.0025 * s.num_tokens for s in shapes]
    binned = BatchTimePredictor.fit(shapes, times, splits=(6, 512))
    assert binned.mape(shapes, times) < 1e-6 and binned.predict(0, 1, 500) == pytest.approx(0.043)
    assert BatchTimePredictor.fit(shapes, times).mape(shapes[:40], times[:40]) > 0.1


def test_a_bin_without_enough_rows_borrows_the_nearest_fit():
    shapes = [BatchShape(p, 0) for p in range(100, 120)] + [BatchShape(0, 2)]
    fitted = BatchTimePredictor.fit(shapes, [0.01 + 1e-4 * s.num_tokens for s in shapes], splits=(6, 512))
    assert fitted.bins[0] == fitted.bins[1] == fitted.bins[2]


def test_a_bin_of_decode_steps_needs_rows_only_for_the_terms_they_determine():
    """Decode steps alone determine three coefficients (the intercept, per decode, per context token; the
    prefill terms stay 0): four of them are enough for a bin of their own."""
    def cost(s: BatchShape) -> float:
        if s.num_tokens <= 6:
            return 0.012 + 0.001 * s.num_decode_tokens + 1e-6 * s.decode_ctx
        return 0.1 + 1e-3 * s.num_tokens
    shapes = [BatchShape(0, d, c) for d, c in ((1, 300), (2, 900), (4, 1500), (5, 4000))]
    shapes += [BatchShape(p, 8, 2000, p) for p in range(100, 400, 20)]
    fitted = BatchTimePredictor.fit(shapes, [cost(s) for s in shapes], splits=(6, 512))
    assert fitted.predict(0, 3, 2500) == pytest.approx(cost(BatchShape(0, 3, 2500)))
    assert fitted.bins[0] != fitted.bins[1]


def test_save_load_roundtrip(tmp_path):
    p = BatchTimePredictor([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1], [0, 1, 0, 1, 0, 1]], splits=(6, 256),
                           meta={"model": "m"})
    p.save(tmp_path / "p.json")
    q = BatchTimePredictor.load(tmp_path / "p.json")
    assert (q.bins, q.splits, q.meta) == (p.bins, (6, 256), {"model": "m"})
    assert q.predict(100, 10) == p.predict(100, 10)


def test_loads_a_profile_saved_with_two_named_bins(tmp_path):
    """Profiles cached by earlier versions hold ``small``, ``large`` and ``split``."""
    old = {"features": ["intercept", "tokens", "prefill", "decode", "decode_ctx", "prefill_ctx"], "split": 256,
           "small": [1, 0, 0, 0, 0, 0], "large": [2, 0, 0, 0, 0, 0], "meta": {}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    p = BatchTimePredictor.load(tmp_path / "old.json")
    assert p.splits == (256,) and p.predict(256, 0) == 1 and p.predict(257, 0) == 2


def test_bins_split_on_total_tokens():
    p = BatchTimePredictor([[1, 0, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0], [3, 0, 0, 0, 0, 0]], splits=(6, 512))
    assert p.predict(0, 6) == 1 and p.predict(1, 6) == 2
    assert p.predict(500, 12) == 2 and p.predict(500, 13) == 3
    with pytest.raises(ValueError, match="increasing"):
        BatchTimePredictor([[1, 0, 0, 0, 0, 0]] * 3, splits=(512, 6))
    with pytest.raises(ValueError, match="need 3 bins"):
        BatchTimePredictor([[1, 0, 0, 0, 0, 0]] * 2, splits=(6, 512))


def test_builtin_profile_and_errors():
    assert "a100-llama3-8b" in builtin_profiles()
    ref = BatchTimePredictor.load("a100-llama3-8b")
    assert ref.predict(256, 0) == pytest.approx(0.014936 + 256 * (5.882475e-05 + 2.247956e-05))
    with pytest.raises(ValueError, match="built-in profiles: a100-llama3-8b"):
        BatchTimePredictor.load("h100-nope")
    with pytest.raises(ValueError, match="6 profile rows"):
        BatchTimePredictor.fit([BatchShape(1, 0)], [0.1])


def test_scaled_predictor_multiplies_every_prediction_and_records_the_scale():
    base = BatchTimePredictor([[0.01, 1e-4, 2e-5, 0, 1e-7, 3e-8], [0.02, 2e-4, 0, 1e-5, 0, 1e-7]])
    slower = base.scaled(1.5).scaled(2.0)
    for shape in [(10, 0, 0, 10), (0, 8, 900, 0), (700, 30, 5000, 900)]:
        assert slower.predict(*shape) == pytest.approx(3.0 * base.predict(*shape))
    assert slower.meta["scale"] == pytest.approx(3.0)
