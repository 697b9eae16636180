"""`niyama bench` and `niyama bench capacity` as a user runs them: real CLI processes against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.server.conftest import QOS_CONFIG

TINY = ["--trace", "synthetic", "--input-len", "12", "--output-len", "4", "--no-progress"]


def _bench(server, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    vocab = [] if "chat" in args else ["--vocab-size", "49152"]  # token-id prompts: the model's vocabulary
    cmd = [sys.executable, "-m", "niyama.cli", "bench", *(args[:1] if args[:1] == ("capacity",) else ()),
           "--base-url", f"{server.url}/v1", "--output-dir", str(tmp_path), *TINY, *vocab,
           *(args[1:] if args[:1] == ("capacity",) else args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_bench_streams_judges_and_writes_jsonl_summary_and_plot(server, tmp_path):
    # The server's classes: a 10 s first-token deadline is a wide margin for 6 tiny requests.
    done = _bench(server, tmp_path, "--qos-config", str(QOS_CONFIG), "--request-rate", "4", "--num-requests", "6",
                  "--importance-mix", "critical=1,sheddable=1", "--label", "tiny", "--goodput", "e2el:600000")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (tmp_path / "bench-tiny.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["error"] is None for r in rows)
    assert all(r["output_tokens"] == 4 and r["prompt_tokens"] == 12 and len(r["chunk_times"]) >= 1 for r in rows)
    assert all(r["slo_met"] for r in rows) and {r["class"] for r in rows} <= {"interactive", "batch-10m", "batch-30m"}
    # The server applied the class the client asked for (Niyama's qos field).
    assert all(r["server_class"] == r["class"] and r["relegated"] is False for r in rows)
    summary = json.loads((tmp_path / "bench-tiny.json").read_text())
    assert summary["overall"]["requests"] == 6 and summary["overall"]["violation_pct"] == 0.0
    assert summary["goodput_rps"] > 0 and summary["errors"] == 0
    # As `vllm bench serve --goodput`: every request finished within 600 s; ITL over every gap between chunks.
    assert summary["goodput_thresholds_rps"] == summary["throughput_rps"] > 0
    assert 0 < summary["itl_p50"] <= summary["itl_p99"]
    assert "goodput (e2el ≤ 600000 ms)" in done.stdout and "ITL p50/p90/p99" in done.stdout
    assert (tmp_path / "bench-tiny.png").stat().st_size > 0
    assert "overall" in done.stdout and "goodput" in done.stdout
    # The server logged the iterations that served them (niyama serve --iteration-log).
    logged = [json.loads(line) for line in server.iteration_log.read_text().splitlines()]
    assert sum(r["num_decode_tokens"] for r in logged) >= 6 * 3 and all(r["seconds"] > 0 for r in logged)


def test_bench_sends_service_tier_and_priority_over_both_endpoints(server, tmp_path):
    for mode, endpoint in (("service-tier", "chat"), ("priority", "completions")):
        done = _bench(server, tmp_path, "--qos-config", str(QOS_CONFIG), "--qos-mode", mode, "--rate", "4",
                      "--num-requests", "3", "--class-mix", "interactive", "--endpoint", endpoint, "--label", mode)
        assert done.returncode == 0, done.stderr
        rows = [json.loads(line) for line in (tmp_path / f"bench-{mode}.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and all(r["error"] is None and r["output_tokens"] == 4 for r in rows)
        # service_tier "priority" maps to the interactive class in the server's config (and it is the default)
        assert all(r["server_class"] == "interactive" for r in rows)
        assert "another class than asked" not in done.stdout
    # Our server's niyama scheduler does not read vLLM's priority: batch requests get its default class, and
    # the client says so (they are still judged by the class they asked for).
    done = _bench(server, tmp_path, "--qos-config", str(QOS_CONFIG), "--qos-mode", "priority", "--rate", "4",
                  "--num-requests", "2", "--class-mix", "batch-10m", "--label", "batch-priority")
    assert done.returncode == 0, done.stderr
    assert "the server applied another class than asked (requests are judged by the class asked): " \
           "batch-10m → interactive (2)" in done.stdout


def test_capacity_search_against_a_live_server_ends_failing_points_early(server, tmp_path):
    impossible = tmp_path / "impossible.toml"  # a 1 ms first-token deadline: every point fails
    impossible.write_text('default = "interactive"\n[classes.interactive]\nttft = 0.001\ntbt = 1.0\n')
    done = _bench(server, tmp_path, "capacity", "--qos-config", str(impossible), "--duration", "8",
                  "--start", "1", "--label", "cap")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "cap.json").read_text())
    assert report["capacity"] == 0.0 and len(report["points"]) >= 2
    rates = [p["rate"] for p in report["points"]]
    assert rates == sorted(rates, reverse=True) and all(p["worst_violation_pct"] > 1 for p in report["points"])
    first = report["points"][0]  # 8 planned requests, ended once the first one missed its deadline
    assert first["stopped_early"] and first["summary"]["overall"]["requests"] < first["summary"]["planned_requests"]
    assert (tmp_path / "cap.png").exists() and (tmp_path / "cap" / "cap-00-1.jsonl").exists()


def test_bench_errors_are_one_readable_line(tmp_path):
    cmd = [sys.executable, "-m", "niyama.cli", "bench", "--base-url", "http://127.0.0.1:9/v1", "--rate", "1",
           "--num-requests", "1", "--output-dir", str(tmp_path), *TINY]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().startswith("niyama: error: cannot reach")
    done = subprocess.run([*cmd, "--model", "m"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().startswith("niyama: error: cannot reach")
    done = subprocess.run([*cmd, "--class-mix", "nosuch"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown QoS class 'nosuch'" in done.stderr
    done = subprocess.run([*cmd, "--output-dir", "/proc"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == "niyama: error: cannot write in /proc"  # not after the run
