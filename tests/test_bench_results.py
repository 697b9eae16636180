"""Judging what a benchmark client saw against each request's QoS (no server needed)."""

from niyama.bench.client import RequestResult, RunResult, _certain_violations
from niyama.bench.results import result_row, run_rows, run_summary
from niyama.qos import Importance, QoSClasses
from niyama.sim.workload import RequestSpec

CLASSES = QoSClasses.from_dict({"default": "chat", "classes": {
    "chat": {"ttft": 1.0, "tbt": 0.5}, "batch": {"ttlt": 10.0, "importance": "sheddable"}}})


def _result(cls: str, sent: float, chunks: list[float], tokens: int | None = None, **kw) -> RequestResult:
    spec = RequestSpec(0.0, 8, tokens or len(chunks), cls, CLASSES[cls].importance)
    finished = kw.pop("finished", chunks[-1] if chunks else None)
    return RequestResult(0, spec, sent=sent, chunk_times=chunks, output_tokens=tokens, finished=finished, **kw)


def test_interactive_is_judged_by_ttft_and_pace_by_cumulative_token_deadlines():
    # Sent at 10; first token due 11, then one every 0.5 s: 11.5, 12.0 ...
    row = result_row(_result("chat", 10.0, [10.9, 11.5, 12.1]), CLASSES)
    assert row["slo_met"] is True and row["tbt_met"] is False
    assert abs(row["ttft"] - 0.9) < 1e-9 and abs(row["max_lateness"] - 0.1) < 1e-9
    late_first = result_row(_result("chat", 10.0, [11.2, 11.3, 11.4]), CLASSES)
    assert late_first["slo_met"] is False and late_first["tbt_met"] is False


def test_merged_tokens_are_judged_by_the_earliest_deadline_among_them():
    # Three chunks but five tokens: chunk 3 is judged as token 3 (due 12.0), not as token 5 (due 13.0), so
    # a stall that ends with the rest of the answer in one chunk is not hidden.
    row = result_row(_result("chat", 10.0, [10.5, 11.2, 12.9], tokens=5), CLASSES)
    assert row["output_tokens"] == 5 and row["tbt_met"] is False
    assert result_row(_result("chat", 10.0, [10.5, 11.2, 11.9], tokens=5), CLASSES)["tbt_met"] is True


def test_a_request_cut_off_by_the_end_of_the_run_is_a_violation():
    """It was judged on what had arrived: an interactive answer that stalled after a timely first token
    counted as met."""
    row = result_row(_result("chat", 10.0, [10.5, 11.0], tokens=None, finished=None, cancelled=True), CLASSES)
    assert row["slo_met"] is False and row["tbt_met"] is False and row["cancelled"] is True


def test_throughput_counts_completed_requests_only():
    done = _result("chat", 0.0, [0.5, 1.0])
    failed = _result("chat", 0.0, [], error="HTTP 500: boom")
    cut = _result("batch", 0.0, [3.0], finished=None, cancelled=True)
    run = RunResult([done, failed, cut], duration=10.0)
    summary = run_summary(run, run_rows(run, CLASSES))
    assert summary["throughput_rps"] == 1 / 10.0 and summary["output_tok_s"] == 2 / 10.0


def test_batch_is_judged_by_the_last_token_and_errors_are_violations():
    assert result_row(_result("batch", 0.0, [3.0, 9.5]), CLASSES)["slo_met"] is True
    assert result_row(_result("batch", 0.0, [3.0, 10.5]), CLASSES)["slo_met"] is False
    failed = result_row(_result("batch", 0.0, [], error="HTTP 429: queue full"), CLASSES)
    assert failed["slo_met"] is False and failed["output_tokens"] == 0 and failed["importance"] == "sheddable"


def test_summary_counts_unsent_requests_out_and_reports_goodput():
    sent = [_result("chat", 0.0, [0.5, 1.0]), _result("batch", 0.0, [20.0])]
    unsent = RequestResult(2, RequestSpec(5.0, 8, 2, "chat", Importance.STANDARD))
    run = RunResult([*sent, unsent], duration=20.0, stop_reason="violations")
    rows = run_rows(run, CLASSES)
    summary = run_summary(run, rows)
    assert len(rows) == 2 and summary["planned_requests"] == 3 and summary["stop_reason"] == "violations"
    assert summary["classes"]["batch"]["violation_pct"] == 100.0
    assert summary["goodput_rps"] == 1 / 20.0


def test_certain_violations_count_only_passed_deadlines():
    waiting = _result("chat", 0.0, [])
    done_late = _result("batch", 0.0, [12.0])
    assert _certain_violations([waiting, done_late], CLASSES, now=0.5) == {"chat": 0, "batch": 1}
    assert _certain_violations([waiting, done_late], CLASSES, now=1.5) == {"chat": 1, "batch": 1}


def test_vllm_style_goodput_thresholds_and_inter_token_latencies():
    """`vllm bench serve --goodput ttft:MS tpot:MS e2el:MS`: completed requests within every threshold."""
    fast = _result("chat", 0.0, [0.2, 0.3, 0.4])  # TTFT 200 ms, TPOT 100 ms, E2EL 400 ms
    slow_pace = _result("chat", 0.0, [0.2, 0.8, 1.4])  # TPOT 600 ms
    late = _result("batch", 0.0, [3.0])  # one token: TTFT = E2EL = 3000 ms, no TPOT
    cut = _result("chat", 0.0, [0.1], finished=None, cancelled=True)
    run = RunResult([fast, slow_pace, late, cut], duration=10.0)
    rows = run_rows(run, CLASSES)
    summary = run_summary(run, rows, {"ttft": 500.0, "tpot": 200.0})
    assert summary["goodput_thresholds_rps"] == 1 / 10.0  # fast only
    assert run_summary(run, rows, {"e2el": 5000.0})["goodput_thresholds_rps"] == 3 / 10.0  # not the cut one
    assert "goodput_thresholds_rps" not in run_summary(run, rows)
    # gaps 100, 100, 600, 600 ms (not the cut request's)
    assert abs(summary["itl_p50"] - 0.35) < 1e-9 and abs(summary["itl_p99"] - 0.6) < 1e-9
