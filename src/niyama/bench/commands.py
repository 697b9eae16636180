"""``niyama bench``: load an OpenAI-compatible server; ``niyama bench capacity``: find its capacity."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from niyama.argtypes import mapping, mix, positive
from niyama.bench.client import QOS_MODES, BenchConfig, RunResult, run_load
from niyama.qos import QoSClasses
from niyama.sim.workload import TRACE_FILES, WorkloadSpec, build_workload


def _add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI API root")
    g.add_argument("--model", default=None, help="model id (default: the first one the server lists)")
    g.add_argument("--api-key", default=None)
    g.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="completions: random token-id prompts of exact length; chat: random-word messages")
    g.add_argument("--qos-mode", choices=QOS_MODES, default="niyama",
                   help="how requests state their class: Niyama's qos field, OpenAI's service_tier, "
                   "vLLM's priority, or not at all")
    g.add_argument("--service-tiers", type=mapping, default=None,
                   help="class=tier for --qos-mode service-tier (default: interactive=priority, others flex)")
    g.add_argument("--priorities", type=mapping, default=None,
                   help="class=int for --qos-mode priority (default: tightest deadline first, from 0)")
    g.add_argument("--no-ignore-eos", action="store_true", help="let answers stop at EOS before max_tokens")
    g.add_argument("--vocab-size", type=int, default=32000, help="random prompt ids are below this")
    w = p.add_argument_group("workload")
    w.add_argument("--trace", default="azure_conv",
                   help=f"lengths from a trace ({', '.join(TRACE_FILES)}, or a CSV path), or 'synthetic' "
                   "with --input-len/--output-len (default: azure_conv)")
    w.add_argument("--input-len", type=int, default=128, help="prompt tokens of --trace synthetic")
    w.add_argument("--output-len", type=int, default=128, help="output tokens of --trace synthetic")
    w.add_argument("--cv", type=positive, default=1.0,
                   help="burstiness: gamma inter-arrivals with this coefficient of variation (1 = Poisson)")
    w.add_argument("--duration", type=positive, default=120.0, help="seconds of arrivals (requests = rate × this)")
    w.add_argument("--num-requests", type=int, default=None, help="number of requests (overrides --duration)")
    w.add_argument("--class-mix", type=mix, default=None, help="e.g. interactive=1,batch-10m=1 (default: equal)")
    w.add_argument("--importance-mix", type=mix, default={"standard": 1.0},
                   help="e.g. critical=0.4,standard=0.4,sheddable=0.2")
    w.add_argument("--length-scale", type=positive, default=1.0, help="multiply trace lengths (small models)")
    w.add_argument("--max-prompt-tokens", type=int, default=None, help="clip longer prompts")
    w.add_argument("--qos-config", default=None,
                   help="QoS classes the requests ask for and are judged by; use the server's file")
    w.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", type=Path, default=Path("results/bench"))
    o.add_argument("--label", default=None, help="file name stem (default: from the QoS mode and rate)")
    o.add_argument("--drain-timeout", type=positive, default=None,
                   help="after the last arrival, cancel what still runs after this many seconds "
                   "(cancelled requests count as violations)")
    o.add_argument("--no-progress", action="store_true")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="load an OpenAI-compatible server and measure SLO attainment",
                              description="Open-loop load against any OpenAI-compatible server (Niyama, vLLM, "
                              "...): per-request JSONL, a per-class summary (JSON and table) and plots.")
    _add_args(p)
    p.add_argument("--rate", type=positive, default=None,
                   help="arrivals per second (default: the trace's own arrival times)")
    p.set_defaults(func=cmd_bench)
    sub = p.add_subparsers(dest="bench_command")
    c = sub.add_parser("capacity", help="highest rate with ≤ 1%% violations in every class, on a live server",
                       description="The simulator's capacity search (bracket, bisect, interpolate) with each "
                       "point a live benchmark run.")
    _add_args(c)
    c.add_argument("--start", type=positive, default=1.0, help="first rate tried (req/s)")
    c.add_argument("--tolerance", type=positive, default=0.05, help="stop bisecting at this relative width")
    c.add_argument("--threshold", type=positive, default=1.0, help="violation %% allowed per class")
    c.add_argument("--stop-at", type=positive, default=10.0,
                   help="end a point early once a class certainly has this %% of violations")
    c.set_defaults(func=cmd_capacity)


def workload(args: argparse.Namespace, classes: QoSClasses, rate: float | None) -> WorkloadSpec:
    synthetic = (args.input_len, args.output_len) if args.trace == "synthetic" else None
    num = args.num_requests or (max(1, int(rate * args.duration)) if rate else None)
    return WorkloadSpec(trace=args.trace, rate=rate, num_requests=num, cv=args.cv,
                        class_mix=args.class_mix or {n: 1.0 for n in classes}, importance_mix=args.importance_mix,
                        length_scale=args.length_scale, max_prompt_tokens=args.max_prompt_tokens,
                        synthetic_lengths=synthetic, seed=args.seed)


def config(args: argparse.Namespace, stop_at: float | None = None) -> BenchConfig:
    priorities = {k: int(v) for k, v in args.priorities.items()} if args.priorities else None
    kwargs: dict[str, Any] = {"service_tiers": args.service_tiers} if args.service_tiers else {}
    return BenchConfig(base_url=args.base_url, model=args.model, endpoint=args.endpoint, qos_mode=args.qos_mode,
                       priorities=priorities, ignore_eos=not args.no_ignore_eos, vocab_size=args.vocab_size,
                       api_key=args.api_key, drain_timeout=args.drain_timeout, stop_at_violation_pct=stop_at,
                       seed=args.seed, progress=not args.no_progress, **kwargs)


def save_run(run: RunResult, classes: QoSClasses, stem: Path, title: str) -> dict[str, Any]:
    """Write ``stem``.jsonl/.json/.png and return the summary."""
    from niyama.bench.results import run_rows, run_summary, write_jsonl
    from niyama.sim import plots

    rows = run_rows(run, classes)
    summary = run_summary(run, rows)
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(rows, Path(f"{stem}.jsonl"))
    Path(f"{stem}.json").write_text(json.dumps(summary, indent=2))
    plots.run_plot(rows, title, Path(f"{stem}.png"))
    return summary


def cmd_bench(args: argparse.Namespace) -> None:
    from niyama.sim.report import format_summary

    classes = QoSClasses.load(args.qos_config)
    specs = build_workload(workload(args, classes, args.rate))
    run = run_load(specs, classes, config(args))
    label = args.label or f"{args.qos_mode}-{args.rate or 'trace'}"
    stem = args.output_dir / f"bench-{label}"
    summary = save_run(run, classes, stem, f"{label}: {len(specs)} requests")
    print(format_summary(summary))
    if summary["errors"]:
        print(f"{summary['errors']} requests failed (counted as violations); see {stem}.jsonl")
    print(f"wrote {stem}.jsonl, {stem}.json, {stem}.png")


def find_live_capacity(args: argparse.Namespace, classes: QoSClasses, out_dir: Path, label: str):
    """The capacity search against the server at ``args.base_url``; each point's files go to ``out_dir``."""
    from niyama.sim.capacity import find_capacity
    from niyama.sim.report import max_class_violation

    runs: list[dict[str, Any]] = []

    def evaluate(rate: float) -> float:
        specs = build_workload(workload(args, classes, rate))
        run = run_load(specs, classes, config(args, stop_at=args.stop_at))
        summary = save_run(run, classes, out_dir / f"{label}-{rate:.3f}", f"{label} at {rate:.3f} req/s")
        # A run ended early proved at least ``stop_at`` % violations in some class: report that bound.
        worst = args.stop_at if run.stopped_early else max_class_violation(summary)
        runs.append({"rate": rate, "worst_violation_pct": worst, "stopped_early": run.stopped_early,
                     "summary": summary})
        print(f"{label}: {rate:.3f} req/s → worst class {'≥ ' if run.stopped_early else ''}{worst:.1f}% violations")
        return worst

    result = find_capacity(evaluate, start=args.start, threshold=args.threshold, rel_tol=args.tolerance)
    return result, runs


def cmd_capacity(args: argparse.Namespace) -> None:
    from niyama.sim import plots

    classes = QoSClasses.load(args.qos_config)
    label = args.label or f"capacity-{args.qos_mode}"
    result, runs = find_live_capacity(args, classes, args.output_dir / label, label)
    path = args.output_dir / f"{label}.json"
    path.write_text(json.dumps({"capacity": result.capacity, "threshold": result.threshold,
                                "points": runs,
                                "args": {k: str(v) for k, v in vars(args).items() if k != "func"}}, indent=2))
    plot = plots.capacity_plot({args.trace: {label: result}}, args.output_dir / f"{label}.png")
    print(f"capacity {result.capacity:.3f} req/s; wrote {path}, {plot}")
