"""Judge what the client saw against each request's QoS, with the simulator's definitions and report.

A request's SLO is judged from the client's clock, from the moment it was sent: interactive requests by
their first token (TTFT), batch requests by their last (TTLT); the token pace (TBT) of interactive requests
is judged against cumulative per-token deadlines and reported apart, as in the simulator. Chunk ``k`` of a
stream is taken to carry token ``k``: a server that merges tokens into one chunk is judged by the earliest
deadline among them, the stricter reading. Failed requests miss their SLO, and so do requests cut short
by the end of the run (drain timeout, early stop): an answer that never completed is no met SLO.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

from niyama.bench.client import RequestResult, RunResult
from niyama.qos import QoSClasses
from niyama.sim.report import percentiles, summarize

GOODPUT_METRICS = ("ttft", "tpot", "e2el")  # what `vllm bench serve --goodput` takes, in ms


def result_row(r: RequestResult, classes: QoSClasses) -> dict[str, Any]:
    qos = classes[r.spec.qos_class]
    times = r.chunk_times if r.error is None else []
    n = (r.output_tokens or len(times)) if times else 0
    sent = r.sent if r.sent is not None else r.spec.arrival
    ttft = times[0] - sent if times else None
    ttlt = r.finished - sent if r.finished is not None and r.error is None else None
    lateness = [t - qos.token_deadline(sent, k) for k, t in enumerate(times, start=1)]
    slo_met = bool(times) and not r.cancelled and not r.missed(qos, math.inf)
    info = r.server_info or {}
    return {
        "id": r.index,
        "class": r.spec.qos_class,
        "importance": r.spec.importance.name.lower(),
        "arrival": sent,
        "prompt_tokens": r.prompt_tokens or r.spec.prompt_tokens,
        "output_tokens": n,
        "ttft": ttft,
        "tbt_mean": (times[-1] - times[0]) / (n - 1) if n > 1 else None,
        "ttlt": ttlt,
        "queue_time": info.get("queue_time"),
        "max_lateness": max(lateness) if lateness else None,
        "slo_met": slo_met,
        "tbt_met": (bool(lateness) and max(lateness) <= 0 and not r.cancelled) if qos.interactive else None,
        "server_class": info.get("class"),  # the class the server applied (Niyama servers say)
        "relegated": info.get("relegated"),
        "preemptions": info.get("num_preemptions"),
        "error": r.error,
        "cancelled": r.cancelled,
        "chunk_times": [round(t - sent, 4) for t in times],
    }


def run_rows(run: RunResult, classes: QoSClasses) -> list[dict[str, Any]]:
    """Rows of the requests that were sent (a run stopped early leaves the rest unsent)."""
    return [result_row(r, classes) for r in run.results if r.sent is not None]


def run_summary(run: RunResult, rows: list[dict[str, Any]], goodput: dict[str, float] | None = None
                ) -> dict[str, Any]:
    """``summarize``'s summary with the client's own figures: errors; inter-token latencies (``itl_p50``
    etc.: every gap between chunks of the completed requests, as `vllm bench serve` reports); and with
    ``goodput`` (metric → ms, e.g. ``{"ttft": 500}``) goodput as `vllm bench serve --goodput` counts it:
    completed requests within every given threshold (TPOT: a request's mean gap after its first token;
    E2EL: its whole time) per second."""
    summary = summarize(rows, run.duration)
    summary.update(percentiles([b - a for r in rows if r["ttlt"] is not None and not r["cancelled"]
                                for a, b in pairwise(r["chunk_times"])], "itl"))
    if goodput:
        good = sum(1 for r in rows if _within(r, goodput))
        summary["goodput_thresholds_ms"] = goodput
        summary["goodput_thresholds_rps"] = good / run.duration if run.duration else 0.0
    summary["errors"] = sum(1 for r in rows if r["error"] is not None)
    summary["first_error"] = next((r["error"] for r in rows if r["error"] is not None), None)
    served_as = Counter(f"{r['class']} → {r['server_class']}" for r in rows
                        if r["server_class"] is not None and r["server_class"] != r["class"])
    summary["served_as_other_class"] = dict(sorted(served_as.items()))
    summary["cancelled"] = sum(1 for r in rows if r["cancelled"])
    summary["planned_requests"] = len(run.results)
    summary["stop_reason"] = run.stop_reason
    return summary


def _within(row: dict[str, Any], goodput: dict[str, float]) -> bool:
    """Whether a completed request is within every ``--goodput`` threshold (ms)."""
    if row["ttlt"] is None or row["cancelled"]:
        return False
    values = {"ttft": row["ttft"], "tpot": row["tbt_mean"] or 0.0, "e2el": row["ttlt"]}  # one token: no TPOT
    return all(values[metric] * 1e3 <= limit for metric, limit in goodput.items())


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
