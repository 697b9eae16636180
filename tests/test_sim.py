import numpy as np
import pytest

from niyama.qos import Importance, QoSClasses
from niyama.scheduler.decode_estimator import DecodeLengthEstimator
from niyama.sim.capacity import find_capacity, interpolate
from niyama.sim.report import max_class_violation, request_row, summarize
from niyama.sim.simulator import SimConfig, simulate
from niyama.sim.workload import WorkloadSpec, build_workload, load_trace, piecewise_arrivals

CLASSES = QoSClasses.load()


def test_traces_load_with_expected_shapes():
    code = load_trace("azure_code")
    assert len(code) == 8819 and code.arrivals is not None and code.arrivals[0] == 0
    assert np.median(code.prompt_tokens) == pytest.approx(1469, abs=5)
    assert load_trace("sharegpt").arrivals is None


def test_workload_rate_mix_and_scaling():
    spec = WorkloadSpec(trace="azure_conv", rate=4.0, num_requests=3000, length_scale=0.5,
                        importance_mix={"critical": 1, "sheddable": 1}, seed=3)
    reqs = build_workload(spec)
    assert len(reqs) == 3000
    assert 3000 / reqs[-1].arrival == pytest.approx(4.0, rel=0.1)
    counts = {c: sum(r.qos_class == c for r in reqs) for c in CLASSES}
    assert all(900 < n < 1100 for n in counts.values())
    assert {r.importance for r in reqs} == {Importance.CRITICAL, Importance.SHEDDABLE}
    trace = load_trace("azure_conv")
    assert reqs[0].prompt_tokens == max(round(trace.prompt_tokens[0] * 0.5), 1)


def test_trace_replay_and_errors():
    reqs = build_workload(WorkloadSpec(trace="azure_code", num_requests=50))
    assert reqs[1].arrival == pytest.approx(0.052)
    with pytest.raises(ValueError, match="no arrival times"):
        build_workload(WorkloadSpec(trace="sharegpt"))
    with pytest.raises(FileNotFoundError, match="no trace 'nope'"):
        build_workload(WorkloadSpec(trace="nope"))


def test_trace_files_from_a_spreadsheet_and_corrupt_rows(tmp_path):
    bom = tmp_path / "bom.csv"  # a spreadsheet's UTF-8 export starts with a byte-order mark
    bom.write_text("\ufeffarrived_at,num_prefill_tokens,num_decode_tokens\n0,10,5\n1.5,20,3\n", encoding="utf-8")
    trace = load_trace(str(bom))
    assert list(trace.arrivals) == [0, 1.5] and list(trace.prompt_tokens) == [10, 20]
    huge = tmp_path / "huge.csv"
    huge.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,5\n1,1e30,5\n")
    with pytest.raises(ValueError, match="row 2 holds a token count above"):
        load_trace(str(huge))


def test_out_of_range_lengths_and_weights():
    with pytest.raises(ValueError, match="length scale 1e.300 makes a request of"):
        build_workload(WorkloadSpec(synthetic_lengths=(100, 10), rate=1.0, num_requests=5, length_scale=1e300))
    huge = build_workload(WorkloadSpec(synthetic_lengths=(100, 10), rate=1.0, num_requests=400,
                                       class_mix={"interactive": 1e308, "batch-10m": 1e308}))
    assert {s.qos_class for s in huge} == {"interactive", "batch-10m"}


def test_a_prompt_larger_than_the_kv_cache_is_refused_by_name():
    specs = build_workload(WorkloadSpec(synthetic_lengths=(500_000, 5), rate=1.0, num_requests=5))
    with pytest.raises(ValueError, match="does not fit the simulated KV cache"):
        simulate(specs, CLASSES, SimConfig("fcfs"))


def test_piecewise_arrivals_follow_each_phase_rate():
    t = piecewise_arrivals([(1000, 2.0), (1000, 5.0)], np.random.default_rng(0))
    assert (t < 1000).sum() == pytest.approx(2000, rel=0.1)
    assert (t >= 1000).sum() == pytest.approx(5000, rel=0.1)


def test_simulation_completes_every_request_deterministically():
    specs = build_workload(WorkloadSpec(trace="azure_conv", rate=2.0, num_requests=400, seed=5))
    a = simulate(specs, CLASSES, SimConfig("niyama", seed=2))
    b = simulate(specs, CLASSES, SimConfig("niyama", seed=2))
    assert all(r.is_finished for r in a.requests)
    assert [r.num_output_tokens for r in a.requests] == [s.decode_tokens for s in specs]
    assert [r.finish_time for r in a.requests] == [r.finish_time for r in b.requests]
    summary = summarize([request_row(r) for r in a.requests], a.duration)
    assert summary["overall"]["requests"] == 400 and max_class_violation(summary) == 0.0


def test_niyama_beats_fcfs_when_fcfs_is_overloaded():
    """A comparison at one load, not a timing test: virtual time makes it deterministic."""
    specs = build_workload(WorkloadSpec(trace="azure_code", rate=3.5, num_requests=1500, seed=1))
    worst = {s: max_class_violation(summarize(*_run(specs, s))) for s in ("fcfs", "niyama")}
    assert worst["fcfs"] > 20 and worst["niyama"] < 1


def _run(specs, scheduler):
    result = simulate(specs, CLASSES, SimConfig(scheduler))
    return [request_row(r) for r in result.requests], result.duration


def test_capacity_search_brackets_bisects_and_interpolates():
    calls = []

    def evaluate(rate):
        calls.append(rate)
        return max(0.0, (rate - 3.0) * 10)  # crosses 1% at 3.1

    res = find_capacity(evaluate, start=1.0, rel_tol=0.01)
    assert res.capacity == pytest.approx(3.1, abs=1e-6)
    assert calls[:4] == [1.0, 1.5, 2.25, 3.375]
    assert interpolate((2.0, 0.0), (4.0, 2.0), 1.0) == 3.0


def test_capacity_search_ends_at_float_resolution_for_a_tiny_tolerance():
    calls = []
    res = find_capacity(lambda rate: calls.append(rate) or (0.0 if rate <= 3.3 else 50.0), start=1.0, rel_tol=1e-20)
    assert res.capacity == pytest.approx(3.3) and len(calls) < 100


def test_report_links_images_relative_to_the_report(tmp_path):
    from niyama.sim.reproduce import Report

    report = Report(tmp_path / "exp", tmp_path / "exp-report.md")
    report.image(tmp_path / "exp" / "sim-ablation.png", "ablation")
    assert "![ablation](exp/sim-ablation.png)" in report.lines
    beside = Report(tmp_path, tmp_path / "report.md")
    beside.image(tmp_path / "sim-ablation.png", "ablation")
    assert "![ablation](sim-ablation.png)" in beside.lines


def test_a_search_that_never_fails_reports_a_lower_bound():
    res = find_capacity(lambda rate: 0.0, start=1.0, max_rate=10.0)
    assert res.at_least and res.capacity >= 10.0 and str(res).startswith("≥ ")
    assert not find_capacity(lambda rate: 0.0 if rate < 3 else 50.0, start=1.0).at_least


def test_capacity_zero_when_nothing_passes():
    assert find_capacity(lambda rate: 50.0, start=1.0).capacity == 0.0


def test_decode_estimate_is_mean_plus_two_sigma_after_history():
    est = DecodeLengthEstimator(prior=128, sigmas=2.0, min_samples=4)
    assert est.estimate("chat") == 128
    for n in (10, 20, 30, 40):
        est.observe("chat", n)
    assert est.estimate("chat") == pytest.approx(25 + 2 * np.std([10, 20, 30, 40], ddof=1))
    assert est.estimate("other") == 128


def test_summary_counts_a_request_behind_its_pace_apart_and_in_the_either_figure():
    def row(slo_met, tbt_met):
        return {"class": "interactive", "importance": "standard", "slo_met": slo_met, "tbt_met": tbt_met,
                "relegated": False, "ttft": 1.0, "tbt_mean": 0.05, "ttlt": 2.0, "prompt_tokens": 10,
                "output_tokens": 5}

    # On time; first token late; first token on time but behind the pace later; both late.
    summary = summarize([row(True, True), row(False, True), row(True, False), row(False, False)], 10.0)
    overall = summary["overall"]
    assert overall["violation_pct"] == 50.0 and overall["tbt_violation_pct"] == 50.0
    assert overall["slo_or_pace_violation_pct"] == 75.0
