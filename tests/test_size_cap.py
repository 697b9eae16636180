import math

from niyama.scheduler.size_cap import SizeCap
from tests.conftest import BATCH, build_scheduler, linear_predictor, make_request


def overloaded_cap(shed_level="standard", sheddable_per_second=0):
    """Ten seconds of arrivals, 1,900 standard prefill tokens/s (nine prompts of 100 tokens and one of 1,000
    per second) and ``sheddable_per_second`` sheddable prompts of 100, for a prefill rate of 600 tokens/s;
    then ten seconds in which relegation shed 300 tokens/s of ``shed_level``."""
    cap = SizeCap()
    for second in range(10):
        for i in range(9):
            cap.arrive(make_request(100, arrival=second + i / 10))
        cap.arrive(make_request(1000, arrival=second + 0.95))
        for i in range(sheddable_per_second):
            cap.arrive(make_request(100, arrival=second + i / 100, importance="sheddable"))
    cap.update(0.0, prefill_rate=600.0)
    cap.shed(make_request(3000, importance=shed_level))
    cap.update(10.0, prefill_rate=600.0)
    return cap


def test_no_cap_until_relegation_sheds():
    cap = SizeCap()
    for i in range(100):
        assert not cap.arrive(make_request(1000, arrival=i / 10))
    cap.update(10.0, prefill_rate=10.0)  # far more work arrives than is served, but nothing was shed
    assert cap.caps == [math.inf] * 3


def test_the_largest_arrivals_carry_the_shed_work():
    # Shed rate after one period: 0.2 × 300 × 0.98 = 58.8 tokens/s, 588 tokens of the window: the
    # largest arrival (1,000 tokens) covers it, so requests of 1,000 tokens or more are relegated on arrival.
    cap = overloaded_cap()
    assert cap.caps[1] == 1000 and math.isinf(cap.caps[0]) and math.isinf(cap.caps[2])
    assert cap.arrive(make_request(1000, arrival=10.0))
    assert not cap.arrive(make_request(999, arrival=10.0))
    assert not cap.arrive(make_request(5000, arrival=10.0, importance="critical"))
    # A batch request is due minutes after it arrives: it waits in the queue, where the walks judge it.
    assert not cap.arrive(make_request(5000, arrival=10.0, qos=BATCH))


def test_a_level_is_capped_only_once_every_less_important_one_is_shed():
    # Sheddable work was shed but none arrives: every new sheddable request goes; standard is spared.
    assert overloaded_cap(shed_level="sheddable").caps == [math.inf, math.inf, 0]
    # Standard work was shed while sheddable requests arrive and are not shed: no level is capped.
    assert overloaded_cap(sheddable_per_second=5).caps == [math.inf] * 3


def test_an_odd_relegation_starts_no_cap():
    # 30 tokens in ten seconds: 3 tokens/s, 0.6 tokens/s once smoothed, under 0.3% of 1,900 tokens/s arriving.
    cap = SizeCap()
    for i in range(100):
        cap.arrive(make_request(190, arrival=i / 10))
    cap.update(0.0, prefill_rate=600.0)
    cap.shed(make_request(30))
    cap.update(10.0, prefill_rate=600.0)
    assert cap.caps == [math.inf] * 3


def test_the_cap_lifts_when_arrivals_fit_the_prefill_rate():
    cap = overloaded_cap()
    cap.update(10.5, prefill_rate=2000.0)
    assert cap.caps == [math.inf] * 3


def test_under_overload_the_scheduler_relegates_large_new_requests_on_arrival():
    # 2,000 prefill tokens/s arrive for a server that prefills about 860 (64-token iterations of 74 ms):
    # the walks relegate, and after a few periods a new 3,000-token prompt goes straight to the relegated queue.
    def run(size_cap):
        s = build_scheduler("niyama", predictor=linear_predictor(0.01, 1e-3), size_cap=size_cap,
                            dynamic_chunking=False, chunk_size=64)
        now = next_arrival = 0.0
        while now < 30.0:
            while next_arrival <= now:
                s.add(make_request(200, arrival=next_arrival))
                next_arrival += 0.1
            batch = s.schedule(now)
            now += s.predictor.predict_shape(batch.shape())
            s.update(batch, now)
        big = make_request(3000, arrival=now)
        s.add(big)
        return big.relegated

    assert run(size_cap=True)
    assert not run(size_cap=False)
