"""Per-request rows and per-class summaries (violation %, latency percentiles, throughput)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from niyama.request import Request

PERCENTILES = (50, 90, 99)


def request_row(r: Request) -> dict[str, Any]:
    n = r.num_output_tokens
    tbt = (r.last_token_time - r.first_token_time) / (n - 1) if n > 1 else None  # type: ignore[operator]
    return {
        "id": r.request_id,
        "class": r.qos.name,
        "importance": r.qos.importance.name.lower(),
        "arrival": r.arrival,
        "prompt_tokens": r.num_prompt_tokens,
        "output_tokens": n,
        "ttft": r.ttft,
        "tbt_mean": tbt,
        "ttlt": r.ttlt,
        "queue_time": r.queue_time,
        "max_lateness": r.max_lateness if n else None,
        "slo_met": r.slo_met,
        "tbt_met": r.tbt_met,
        "relegated": r.relegated,
        "preemptions": r.num_preemptions,
    }


def write_rows(rows: list[dict[str, Any]], path: str | Path) -> None:
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["id"])
        writer.writeheader()
        writer.writerows(rows)


def percentiles(values: list[float], prefix: str) -> dict[str, float | None]:
    """``{prefix}_p50`` etc. over the values that are not None."""
    arr = np.array([v for v in values if v is not None], dtype=float)
    return {f"{prefix}_p{p}": (float(np.percentile(arr, p)) if arr.size else None) for p in PERCENTILES}


def _group_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    violated = sum(1 for r in rows if r["slo_met"] is not True)
    interactive = [r for r in rows if r["tbt_met"] is not None]
    summary: dict[str, Any] = {
        "requests": n,
        "violation_pct": 100.0 * violated / n if n else 0.0,
        "tbt_violation_pct": (100.0 * sum(1 for r in interactive if not r["tbt_met"]) / len(interactive)
                              if interactive else None),
        # The SLO (first or last token) or, for interactive requests, the token pace: what a user notices.
        "slo_or_pace_violation_pct": (100.0 * sum(1 for r in rows if r["slo_met"] is not True or r["tbt_met"] is False)
                                      / n if n else 0.0),
        "relegated": sum(1 for r in rows if r.get("relegated")),
    }
    for key in ("ttft", "tbt_mean", "ttlt"):
        summary.update(percentiles([r[key] for r in rows], key.removesuffix("_mean")))
    return summary


def summarize(rows: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    """Summary per QoS class and per importance level, plus ``overall``, throughput and goodput.

    ``rows`` are ``request_row`` dicts (simulated requests) or the benchmark client's rows (same keys).
    Goodput is as ``vllm bench serve`` defines it, with each request's own SLO: requests that met it per
    second of the run. Throughput, as there, counts completed requests only (the client's rows may hold
    failed and cut-off ones).
    """
    by_class: dict[str, list[dict[str, Any]]] = {}
    by_importance: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_class.setdefault(row["class"], []).append(row)
        by_importance.setdefault(row["importance"], []).append(row)
    completed = [r for r in rows if r.get("error") is None and not r.get("cancelled")]
    tokens = sum(r["prompt_tokens"] + r["output_tokens"] for r in completed)
    output_tokens = sum(r["output_tokens"] for r in completed)
    good = sum(1 for r in rows if r["slo_met"] is True)
    return {
        "overall": _group_summary(rows),
        "classes": {k: _group_summary(v) for k, v in sorted(by_class.items())},
        "importance": {k: _group_summary(v) for k, v in sorted(by_importance.items())},
        "duration_s": duration,
        "throughput_rps": len(completed) / duration if duration else 0.0,
        "throughput_tok_s": tokens / duration if duration else 0.0,
        "output_tok_s": output_tokens / duration if duration else 0.0,
        "goodput_rps": good / duration if duration else 0.0,
    }


def max_class_violation(summary: dict[str, Any]) -> float:
    """The capacity criterion: the worst class's violation percentage."""
    return max(c["violation_pct"] for c in summary["classes"].values())


def format_summary(summary: dict[str, Any]) -> str:
    def fmt(v: float | None, scale: float = 1.0) -> str:
        return "-" if v is None else f"{v * scale:.2f}"

    lines = [f"{'class':<14}{'n':>7}{'viol%':>8}{'tbt-viol%':>10}{'releg':>7}"
             f"{'TTFT p50/p99 (s)':>20}{'TBT p50/p99 (ms)':>20}{'TTLT p50/p99 (s)':>20}"]
    groups = {**summary["classes"], **{f"[{k}]": v for k, v in summary["importance"].items()},
              "overall": summary["overall"]}
    for name, s in groups.items():
        lines.append(
            f"{name:<14}{s['requests']:>7}{s['violation_pct']:>8.2f}{fmt(s['tbt_violation_pct']):>10}"
            f"{s['relegated']:>7}{fmt(s['ttft_p50']) + '/' + fmt(s['ttft_p99']):>20}"
            f"{fmt(s['tbt_p50'], 1e3) + '/' + fmt(s['tbt_p99'], 1e3):>20}"
            f"{fmt(s['ttlt_p50']) + '/' + fmt(s['ttlt_p99']):>20}")
    lines.append(f"duration {summary['duration_s']:.1f} s, {summary['throughput_rps']:.2f} req/s, "
                 f"{summary['throughput_tok_s']:.0f} tok/s, goodput {summary['goodput_rps']:.2f} req/s")
    return "\n".join(lines)
