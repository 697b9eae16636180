import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from niyama.request import RequestStatus
from niyama.scheduler import SCHEDULERS, SchedulerConfig
from tests.conftest import BATCH, CHAT, build_scheduler, linear_predictor, make_request, run_to_completion


def prefill_ids(batch):
    return [r.request_id for r, _ in batch.prefills]


def test_fcfs_fills_a_fixed_budget_in_arrival_order(build):
    s = build("fcfs", chunk_size=256)
    for i, prompt in enumerate([100, 200, 300]):
        s.add(make_request(prompt, arrival=float(i), rid=f"a{i}"))
    batch = s.schedule(now=5.0)
    assert [(r.request_id, n) for r, n in batch.prefills] == [("a0", 100), ("a1", 156)]
    s.update(batch, 5.1)
    batch = s.schedule(now=5.1)
    # a0 now decodes (decodes first); the partly prefilled a1 continues before a2 starts.
    assert [r.request_id for r in batch.decodes] == ["a0"]
    assert [(r.request_id, n) for r, n in batch.prefills] == [("a1", 44), ("a2", 211)]


def test_edf_orders_by_deadline_and_batch_deadline_less_decode_time(build):
    s = build("edf", chunk_size=10_000)
    s.add(make_request(10, arrival=0.0, qos=BATCH, rid="batch"))  # deadline 600 − decode estimate
    s.add(make_request(10, arrival=5.0, qos=CHAT, rid="late-chat"))  # deadline 11
    s.add(make_request(10, arrival=1.0, qos=CHAT, rid="early-chat"))  # deadline 7
    assert prefill_ids(s.schedule(6.0)) == ["early-chat", "late-chat", "batch"]
    batch_req = s.get("batch")
    assert s.prefill_deadline(batch_req) == pytest.approx(600.0 - 16 * s.iteration_time)


def test_srpf_orders_by_remaining_prompt(build):
    s = build("srpf", chunk_size=10_000)
    for rid, prompt in [("long", 900), ("short", 10), ("mid", 300)]:
        s.add(make_request(prompt, rid=rid))
    assert prefill_ids(s.schedule(0.0)) == ["short", "mid", "long"]


def test_priority_is_strict_then_fcfs(build):
    s = build("priority", chunk_size=10_000)
    s.add(make_request(10, arrival=0.0, priority=5, rid="low"))
    s.add(make_request(10, arrival=2.0, priority=0, rid="high-2"))
    s.add(make_request(10, arrival=1.0, priority=0, rid="high-1"))
    assert prefill_ids(s.schedule(3.0)) == ["high-1", "high-2", "low"]


def test_hybrid_priority_trades_deadline_for_remaining_work(build):
    # Deadlines 6.0 and 6.5; prompts 2000 and 10 tokens. EDF (α=0) takes the earlier deadline,
    # α = 8 ms/token makes the short one win (6.5 + 0.08 < 6.0 + 16).
    edfish = build("niyama", hybrid_alpha=0.0, relegation=False, dynamic_chunking=False, chunk_size=10_000)
    hybrid = build("niyama", hybrid_alpha=0.008, relegation=False, dynamic_chunking=False, chunk_size=10_000)
    for s in (edfish, hybrid):
        s.add(make_request(2000, arrival=0.0, rid="big"))
        s.add(make_request(10, arrival=0.5, rid="small"))
    assert prefill_ids(edfish.schedule(1.0)) == ["big", "small"]
    assert prefill_ids(hybrid.schedule(1.0)) == ["small", "big"]


def _decoding(s, rid, arrival, now, qos=CHAT):
    """Add a request and run it until it is decoding."""
    r = make_request(10, arrival=arrival, qos=qos, max_tokens=1000, rid=rid)
    s.add(r)
    s.update(s.schedule(now), now)
    assert r.is_decoding
    return r


@pytest.mark.parametrize(("slack", "expected"), [(0.05, 256), (0.2, 1536), (0.0, 128), (10.0, 2552)])
def test_dynamic_chunk_is_largest_candidate_within_slack(build, slack, expected):
    # Predicted time 0.01 + 1e-4 × tokens, × 1.2 safety: slack 0.05 allows ≤ 316 tokens → 256.
    s = build("niyama", predictor=linear_predictor(0.01, 1e-4), relegation=False)
    r = _decoding(s, "d", arrival=0.0, now=0.0)
    now = r.next_token_deadline - slack
    assert s.token_budget([r], now) == expected


def test_batch_decode_limits_the_chunk_only_when_its_expected_tokens_barely_fit(build):
    # Batch work has no pace: its slack is the time left less its expected remaining tokens (the class's
    # mean length; the prior of 128 before any history) at the running iteration time.
    s = build("niyama", predictor=linear_predictor(0.01, 1e-4), relegation=False)
    r = _decoding(s, "b", arrival=0.0, now=0.0, qos=BATCH)
    rest = (128 - r.num_output_tokens - 1) * s.iteration_time
    assert s.token_budget([r], 1.0) == 2552  # 599 s left, ~4.5 s of expected decoding: no limit
    assert s.token_budget([r], r.deadline - rest - 0.05) == 256  # 0.05 s to spare, as for a chat token
    assert s.token_budget([r], r.deadline + 1.0) == 2552  # late already: smaller chunks cannot save it


def test_rescaled_predictor_shrinks_the_chunk_and_the_prefill_rate(build):
    # Slack 0.2 s fits 1536 tokens at (0.01 + 1e-4/token) × 1.2 safety; twice as slow, ≤ 733 fit → 512.
    profile = linear_predictor(0.01, 1e-4)
    s = build("niyama", predictor=profile, relegation=False)
    r = _decoding(s, "d", arrival=0.0, now=0.0)
    now = r.next_token_deadline - 0.2
    rate, iteration = s.prefill_rate, s.iteration_time
    assert s.token_budget([r], now) == 1536
    s.set_predictor(profile.scaled(2.0))
    assert s.token_budget([r], now) == 512
    assert s.iteration_time == pytest.approx(2 * iteration) and s.prefill_rate == pytest.approx(rate / 2)


def test_iteration_time_follows_the_batches_it_schedules(build):
    # Starts at a full chunk's predicted time; a lone decode's iterations are far shorter, so the time
    # that prices a batch request's remaining tokens falls towards them.
    s = build("niyama", predictor=linear_predictor(0.01, 1e-4), relegation=False)
    start = s.iteration_time
    assert start == pytest.approx(s.predictor.predict(s.config.chunk_size, 0))
    r = _decoding(s, "d", arrival=0.0, now=0.0)
    times = []
    for _ in range(40):
        batch = s.schedule(1.0)
        assert batch.decodes == [r]
        s.update(batch, 1.0)
        times.append(s.iteration_time)
    decode_only = s.predictor.predict(0, 1, r.num_computed_tokens)
    assert times == sorted(times, reverse=True) and decode_only < times[-1] < 0.5 * start


def test_dynamic_chunk_without_decodes_and_under_memory_pressure(build):
    s = build("niyama", num_blocks=100, block_size=16, relegation=False)
    assert s.token_budget([], 0.0) == 2552
    hog = make_request(95 * 16 - 1, max_tokens=1)
    s.kv.allocate(hog, 95 * 16)  # 5% free < 10% low-memory threshold
    assert s.token_budget([], 0.0) == 512


@pytest.mark.parametrize(("cap", "order"), [(4.0, ["now", "long", "later"]), (float("inf"), ["now", "later", "long"])])
def test_hybrid_term_is_capped_by_the_slo_window(build, cap, order):
    # α = 8 ms/token: the 10,000-token prompt's term (80 s) is capped at 4 × its 6 s TTFT window, so it goes
    # at 6 + 24 = 30 s, ahead of a short prompt due at 46 s; uncapped it would go at 86 s, behind it.
    s = build("niyama", hybrid_alpha=0.008, hybrid_cap=cap, relegation=False, dynamic_chunking=False,
              chunk_size=20_000)
    s.add(make_request(10_000, arrival=0.0, rid="long"))
    s.add(make_request(100, arrival=40.0, rid="later"))
    s.add(make_request(100, arrival=20.0, rid="now"))
    assert prefill_ids(s.schedule(41.0)) == order


def test_chunk_budget_limits_the_batch(build):
    s = build("niyama", predictor=linear_predictor(0.01, 1e-4), relegation=False)
    r = _decoding(s, "d", arrival=0.0, now=0.0)
    s.add(make_request(5000, arrival=0.0, rid="p"))
    batch = s.schedule(r.next_token_deadline - 0.05)
    assert [x.request_id for x in batch.decodes] == ["d"]
    assert batch.num_tokens == 256


def test_relegation_drops_sheddable_before_standard_before_critical(build):
    # Five prompts of one second each at the scheduler's prefill-rate estimate, all due in 3.5 s:
    # only three fit, and the two sheddable ones make room although they came first.
    s = build("niyama", predictor=linear_predictor(0.01, 1e-4), hybrid_alpha=0.0)
    prompt = int(s.prefill_rate)
    order = [("shed", "sheddable"), ("std-1", "standard"), ("crit", "critical"), ("std-2", "standard"),
             ("shed-2", "sheddable")]
    for i, (rid, imp) in enumerate(order):
        s.add(make_request(prompt, arrival=-2.5 + i * 1e-3, importance=imp, rid=rid))
    s.schedule(0.0)
    relegated = {r.request_id for _, _, r in s.relegated} | {r.request_id for r in s.running if r.relegated}
    assert relegated == {"shed", "shed-2"}


def test_relegation_sheds_the_largest_request_of_a_level(build):
    # Same deadline for all; one big prompt (2 s) and three small ones (0.5 s) with 2.2 s to go:
    # dropping the big one saves three, dropping small ones would not be enough.
    s = build("niyama", predictor=linear_predictor(0.01, 1e-4), hybrid_alpha=0.0)
    rate = s.prefill_rate
    for i, (rid, seconds) in enumerate([("small-1", 0.5), ("big", 2.0), ("small-2", 0.5), ("small-3", 0.5)]):
        s.add(make_request(int(rate * seconds), arrival=-3.8 + i * 1e-3, rid=rid))
    s.schedule(0.0)
    assert [r.request_id for _, _, r in s.relegated] == ["big"]


@pytest.mark.parametrize(("depth", "relegated", "order"), [(8, [], ["big", "big-2", "small"]),
                                                             (0, ["big"], ["small", "big-2", "big"])])
def test_requests_at_risk_are_promoted_to_deadline_order_before_anyone_is_relegated(build, monkeypatch, depth,
                                                                                    relegated, order):
    # Hybrid order: small (0.3 s of work, due at 5 s), big (1.0 s, due at 2 s), big-2 (0.9 s, due at 2.1 s).
    # In that order big-2 would end at 2.2 s; promoted to deadline order, all three make it and nobody is
    # relegated. Without promotion (depth 0) the walk relegates the largest of the level, big, which gets
    # only the budget left over.
    monkeypatch.setattr(type(build("niyama")), "PROMOTE_DEPTH", depth)
    s = build("niyama", predictor=linear_predictor(0.01, 1e-4), chunk_candidates=(100_000,))
    rate = s.prefill_rate
    for rid, seconds, arrival in [("small", 0.3, -1.0), ("big", 1.0, -4.0), ("big-2", 0.9, -3.9)]:
        s.add(make_request(int(rate * seconds), arrival=arrival, rid=rid))
    assert [r.request_id for _, _, r in s.waiting] == ["small", "big", "big-2"]
    batch = s.schedule(0.0)
    assert [r.request_id for r, _ in batch.prefills if r.relegated] == relegated
    assert prefill_ids(batch) == order


def test_promotion_keeps_a_request_at_risk_ahead_of_later_arrivals(build):
    # A 1 s prompt due in 1.5 s fits, but within the 1 s until the next walk; promoted to its deadline as
    # priority, a short prompt arriving after the walk no longer goes before it (hybrid order would put it first).
    s = build("niyama", predictor=linear_predictor(0.01, 1e-4), chunk_candidates=(100,))
    big = make_request(int(s.prefill_rate), arrival=-4.5, rid="big")
    s.add(big)
    s.schedule(0.0)
    s.add(make_request(10, arrival=0.01, rid="short"))
    assert prefill_ids(s.schedule(0.02)) == ["big"]
    hybrid = build("niyama", predictor=linear_predictor(0.01, 1e-4), chunk_candidates=(100,), relegation=False)
    hybrid.add(make_request(int(s.prefill_rate), arrival=-4.5, rid="big"))
    hybrid.schedule(0.0)
    hybrid.add(make_request(10, arrival=0.01, rid="short"))
    assert prefill_ids(hybrid.schedule(0.02))[0] == "short"


def test_a_request_at_risk_may_overtake_sheddable_work_into_its_margin(build):
    # shed (0.3 s, due at 2 s) is kept: it ends at 0.3 s, inside its margin (half the time left: 1 s).
    # big (1 s, due at 1.5 s) ends at 1.3 s, within one walk period of its deadline: promoted, it ends at
    # 1.0 s and shed at 1.3 s, past its margin but before its deadline. The margin is kept for such work.
    s = build("niyama", predictor=linear_predictor(0.01, 1e-4), chunk_candidates=(100,))
    rate = s.prefill_rate
    s.add(make_request(int(rate * 0.3), arrival=-4.0, importance="sheddable", rid="shed"))
    s.add(make_request(int(rate), arrival=-4.5, importance="standard", rid="big"))
    assert [r.request_id for _, _, r in s.waiting] == ["shed", "big"]
    assert prefill_ids(s.schedule(0.0)) == ["big"]


@pytest.mark.parametrize(("margin", "relegated"), [(2.0, {"shed"}), (1.0, set())])
def test_sheddable_requests_must_fit_with_a_margin(build, margin, relegated):
    # Two prompts of one second each, both due in 3 s: both fit, but the sheddable one finishes after
    # half of its time is gone, so with a margin of 2 it leaves that headroom to more important work.
    s = build("niyama", predictor=linear_predictor(0.01, 1e-4), hybrid_alpha=0.0, sheddable_margin=margin)
    prompt = int(s.prefill_rate)
    s.add(make_request(prompt, arrival=-3.0, importance="standard", rid="std"))
    s.add(make_request(prompt, arrival=-3.0 + 1e-3, importance="sheddable", rid="shed"))
    s.schedule(0.0)
    assert {r.request_id for _, _, r in s.relegated} == relegated


def test_leftover_budget_goes_to_relegated_requests_that_can_still_make_it(build):
    # Relegated in key order: a standard request already past its deadline, then a sheddable one
    # relegated for its margin that can still make it alone. The leftover budget goes to the latter.
    s = build("niyama", predictor=linear_predictor(0.01, 1e-4), dynamic_chunking=False, chunk_size=64)
    late = make_request(100, arrival=-10.0, importance="standard", rid="late")
    viable = make_request(int(s.prefill_rate * 2), arrival=-3.0, importance="sheddable", rid="viable")
    s.add(late)
    s.add(viable)
    batch = s.schedule(0.0)
    assert [r.request_id for _, _, r in s.relegated] == ["late"]  # "viable" started: it left the queue
    assert late.relegated and viable.relegated
    assert prefill_ids(batch) == ["viable"]


def test_hopeless_request_is_relegated_but_still_completes(build):
    s = build("niyama", predictor=linear_predictor(0.01, 1e-4))
    hopeless = make_request(50, arrival=-10.0, rid="late")  # TTFT deadline already passed
    fine = make_request(50, arrival=0.0, rid="ok")
    finished = run_to_completion(s, [hopeless, fine])
    assert hopeless.relegated and not fine.relegated
    assert {r.request_id for r in finished} == {"late", "ok"}
    assert hopeless.slo_met is False and fine.slo_met is True


def test_a_relegation_walk_starts_once_per_period(build):
    s = build("niyama", predictor=linear_predictor(0.01, 1e-4), relegation_period=1.0)
    s.add(make_request(50, rid="a"))
    assert s.walk_due(0.0)
    s.schedule(0.0)
    assert not s.walk_due(0.5) and s.walk_due(1.0)
    assert not build("niyama", predictor=linear_predictor(0.01, 1e-4), relegation=False).walk_due(0.0)


def test_a_walk_in_steps_relegates_what_one_full_walk_does(build):
    levels = ["critical", "standard", "sheddable"]

    def walk(step):
        s = build("niyama", predictor=linear_predictor(0.01, 1e-4))
        s.WALK_STEP = step
        rng = random.Random(0)
        for i in range(700):
            s.add(make_request(rng.randint(10, 3000), arrival=-rng.uniform(0, 5.5), importance=levels[i % 3],
                               rid=f"r{i}"))
        decisions = 0
        while s.walk_due(0.0):
            s.relegate([r for _, _, r in s.waiting], 0.0)
            decisions += 1
        return decisions, {r.request_id for _, _, r in s.relegated}

    decisions, relegated = walk(256)
    assert decisions == 3
    assert 0 < len(relegated) < 700
    assert walk(10_000) == (1, relegated)


def test_a_walk_never_relegates_a_request_whose_prefill_ended_since_it_began(build):
    # The walk takes one request per decision. "shed" (1 s of prefill) fits, and the first decision
    # prefills it and 0.2 s of "std" (5 s); at the next, "std" misses its deadline by 0.3 s because of
    # "shed", which now decodes: relegating it would save nothing, so "std" goes, the largest of its level.
    s = build("niyama", predictor=linear_predictor(0.01, 1e-4), dynamic_chunking=False, hybrid_alpha=0.0)
    rate = s.prefill_rate
    s.config.chunk_size = int(rate * 1.2)
    s.WALK_STEP = 1
    s.add(make_request(int(rate), arrival=-1.0, importance="sheddable", rid="shed"))
    s.add(make_request(int(rate * 5), arrival=-0.5, importance="standard", rid="std"))
    s.update(s.schedule(0.0), 0.0)
    shed, std = s.get("shed"), s.get("std")
    assert shed.is_decoding and std.status is RequestStatus.RUNNING and s.walk_due(0.0)
    s.schedule(0.0)
    assert not shed.relegated and std.relegated


def test_preemption_frees_blocks_and_recomputes_without_loss(build):
    # 6 blocks of 4 tokens = 24 tokens; two requests of 8 prompt + 8 output tokens cannot both finish.
    s = build("fcfs", num_blocks=6, block_size=4, chunk_size=64)
    a = make_request(8, arrival=0.0, max_tokens=8, rid="a")
    b = make_request(8, arrival=1.0, max_tokens=8, rid="b", importance="sheddable")
    finished = run_to_completion(s, [a, b])
    assert {r.request_id for r in finished} == {"a", "b"}
    assert s.num_preemptions >= 1 and b.num_preemptions >= 1 and a.num_preemptions == 0
    assert a.num_output_tokens == b.num_output_tokens == 8
    assert s.kv.num_free_blocks == 6


def test_preempted_request_keeps_its_output_and_recomputes_it(build):
    s = build("fcfs", num_blocks=100, block_size=4, chunk_size=64)
    r = make_request(8, max_tokens=8)
    s.add(r)
    for t in range(3):
        s.update(s.schedule(float(t)), float(t) + 0.5)
    assert r.num_output_tokens == 3 and r.status is RequestStatus.RUNNING
    s.preempt(r)
    assert r.status is RequestStatus.PREEMPTED and r.block_ids == [] and s.kv.num_free_blocks == 100
    batch = s.schedule(4.0)
    assert batch.prefills == [(r, 8 + 3)]  # prompt plus the tokens already generated
    s.update(batch, 4.5)
    assert r.num_output_tokens == 4 and r.is_decoding


def test_abort_frees_everything(build):
    s = build("niyama")
    r = make_request(100)
    s.add(r)
    s.update(s.schedule(0.0), 0.1)
    assert s.kv.num_free_blocks < s.kv.num_blocks
    assert s.abort(r.request_id, 0.2) is r
    assert r.status is RequestStatus.ABORTED and s.kv.num_free_blocks == s.kv.num_blocks
    assert not s.has_work() and s.abort(r.request_id, 0.3) is None


def test_request_that_can_never_fit_is_rejected(build):
    s = build("fcfs", num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        s.add(make_request(10, max_tokens=10))


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(sorted(SCHEDULERS)),
    jobs=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 12), st.floats(0, 2), st.booleans(),
                            st.sampled_from(["critical", "standard", "sheddable"])), min_size=1, max_size=12),
    num_blocks=st.integers(20, 60),
)
def test_every_request_finishes_under_memory_pressure(name, jobs, num_blocks):
    """Any policy, any mix, a KV cache far too small for everything at once: nothing is lost, every
    request gets exactly its tokens, and all blocks come back."""
    s = build_scheduler(name, num_blocks=num_blocks, block_size=4, chunk_size=32)
    reqs = [make_request(p, arrival=a, max_tokens=m, qos=BATCH if batch else CHAT, importance=imp)
            for p, m, a, batch, imp in jobs]
    finished = run_to_completion(s, reqs)
    assert sorted(r.request_id for r in finished) == sorted(r.request_id for r in reqs)
    assert all(r.num_output_tokens == r.max_tokens for r in reqs)
    assert s.kv.num_free_blocks == num_blocks


def test_unknown_scheduler(build):
    with pytest.raises(ValueError, match="unknown scheduler 'lifo'"):
        build("lifo")


def test_partly_prefilled_requests_keep_their_place_in_priority_order(build):
    # SRPF: after a 60-token chunk, p70 has 10 tokens left and slots in among the waiting prompts.
    s = build("srpf", chunk_size=60)
    s.add(make_request(70, rid="p70"))
    s.add(make_request(100, rid="p100"))
    s.update(s.schedule(0.0), 0.1)
    s.add(make_request(5, rid="w5"))
    s.add(make_request(50, rid="w50"))
    s.add(make_request(200, rid="w200"))
    order = [r.request_id for r in s._prefill_order(0.2)]
    assert order == ["w5", "p70", "w50", "p100", "w200"]


def test_config_within_an_iteration_limit_keeps_every_chunk_under_it():
    config = SchedulerConfig.within(300, max_num_seqs=8, chunk_size=512)
    assert config.chunk_candidates == (128, 256, 300) and config.chunk_size == 300
    assert config.low_memory_chunk == 300 and config.max_num_seqs == 8
    assert SchedulerConfig.within(2048).low_memory_chunk == 512


def test_a_batch_decode_past_its_class_estimate_is_paced_to_go_on_as_long_again(build):
    # No history: mean and over-estimate are both the prior (128 tokens). At 200 tokens the request is
    # expected to go on for 199 more while that fits before its deadline; once it cannot, only its mean counts
    # (which it has passed: one token left), so it no longer limits the chunk.
    s = build("niyama", predictor=linear_predictor(0.01, 1e-4), relegation=False)
    r = _decoding(s, "b", arrival=0.0, now=0.0, qos=BATCH)
    while r.num_output_tokens < 200:
        s.update(s.schedule(1.0), 1.0)
    again = 199 * s.iteration_time
    assert s.token_budget([r], r.deadline - again - 0.05) == 256  # 0.05 s to spare, as for a chat token
    assert s.token_budget([r], r.deadline - again - 10.0) == 2552
    assert s.token_budget([r], r.deadline - again + 1.0) == 2552  # cannot keep that pace: not held to it


@pytest.mark.parametrize("shedding", [False, True])
def test_a_decode_that_keeps_the_chunk_small_is_relegated_once_that_costs_more_than_shedding(build, shedding):
    # Slack 0.05 s allows 256 tokens (35.6 ms) instead of 2,552 (265.2 ms): each iteration prefills 255
    # tokens where the budget without this decode would prefill 2,551 × 35.6 / 265.2 ≈ 342 in that time, a
    # rent of ~87 tokens. While standard requests of 1,000 tokens and more are shed, the decode is relegated
    # at the iteration whose rent reaches 1,000 (the 12th); otherwise it keeps its pace.
    s = build("niyama", predictor=linear_predictor(0.01, 1e-4))
    r = _decoding(s, "d", arrival=0.0, now=0.0)
    if shedding:
        s.size_cap.caps[r.qos.importance] = 1000
    rent = 0.0356 * 2551 / 0.2652 - 255
    budgets = [s.token_budget([r], r.next_token_deadline - 0.05) for _ in range(20)]
    paced = math.ceil(1000 / rent) - 1 if shedding else 20
    assert budgets == [256] * paced + [2552] * (20 - paced)
    assert r.relegated == shedding
    assert s.schedule(1.0).decodes == [r]  # relegated or not, it gets its token every iteration
