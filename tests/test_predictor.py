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


def test_fit_recovers_known_coefficients():
    truth = BatchTimePredictor.load("a100-llama3-8b")
    rng = np.random.default_rng(0)
    shapes = _random_shapes(rng, 400, 512) + _random_shapes(rng, 400, 2552)
    times = [truth.predict_shape(s) for s in shapes]
    fitted = BatchTimePredictor.fit(shapes, times)
    assert np.allclose(fitted.small, truth.small, rtol=1e-4, atol=1e-9)
    # Features of the large bin are collinear only if decode counts never vary; they do here.
    assert np.allclose(fitted.large, truth.large, rtol=1e-4, atol=1e-9)
    assert fitted.mape(shapes, times) < 1e-6


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


def test_save_load_roundtrip(tmp_path):
    p = BatchTimePredictor([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1], split=256, meta={"model": "m"})
    p.save(tmp_path / "p.json")
    q = BatchTimePredictor.load(tmp_path / "p.json")
    assert (q.small, q.large, q.split, q.meta) == (p.small, p.large, 256, {"model": "m"})
    assert q.predict(100, 10) == p.predict(100, 10)


def test_bins_split_on_total_tokens():
    p = BatchTimePredictor([1, 0, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0], split=512)
    assert p.predict(500, 12) == 1 and p.predict(500, 13) == 2


def test_builtin_profile_and_errors():
    assert "a100-llama3-8b" in builtin_profiles()
    ref = BatchTimePredictor.load("a100-llama3-8b")
    assert ref.predict(256, 0) == pytest.approx(0.014936 + 256 * (5.882475e-05 + 2.247956e-05))
    with pytest.raises(ValueError, match="built-in profiles: a100-llama3-8b"):
        BatchTimePredictor.load("h100-nope")
    with pytest.raises(ValueError, match="6 profile rows"):
        BatchTimePredictor.fit([BatchShape(1, 0)], [0.1])


def test_scaled_predictor_multiplies_every_prediction_and_records_the_scale():
    base = BatchTimePredictor([0.01, 1e-4, 2e-5, 0, 1e-7, 3e-8], [0.02, 2e-4, 0, 1e-5, 0, 1e-7])
    slower = base.scaled(1.5).scaled(2.0)
    for shape in [(10, 0, 0, 10), (0, 8, 900, 0), (700, 30, 5000, 900)]:
        assert slower.predict(*shape) == pytest.approx(3.0 * base.predict(*shape))
    assert slower.meta["scale"] == pytest.approx(3.0)
