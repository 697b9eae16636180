"""``niyama bench``: load an OpenAI-compatible server; ``niyama bench capacity``: find its capacity."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from niyama.argtypes import (
    at_least,
    ensure_writable_dir,
    file_stem,
    int_mapping,
    mapping,
    mix,
    non_negative_int,
    percent,
    positive,
    positive_int,
    threshold,
)
from niyama.bench.client import QOS_MODES, BenchConfig, RunResult, ServerError, run_load
from niyama.bench.results import GOODPUT_METRICS
from niyama.qos import QoSClasses
from niyama.sim.workload import TRACE_FILES, WorkloadSpec, build_workload, requests_in


def _add_args(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options `niyama bench` and `niyama bench capacity` share; returns their actions."""
    actions: list[argparse.Action] = []

    def add(group, *names: str, **kw: Any) -> None:
        actions.append(group.add_argument(*names, **kw))

    g = p.add_argument_group("server")
    add(g, "--base-url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI API root")
    add(g, "--model", default=None, help="model id (default: the first one the server lists)")
    add(g, "--api-key", default=None, help="sent as a bearer token")
    add(g, "--endpoint", choices=["completions", "chat"], default="completions",
           help="completions: random token-id prompts of exact length; chat: random-word messages")
    add(g, "--qos-mode", choices=QOS_MODES, default="niyama",
           help="how requests state their class: Niyama's qos field, OpenAI's service_tier, "
           "vLLM's priority, or not at all")
    add(g, "--service-tiers", type=mapping, default=None,
           help="class=tier for --qos-mode service-tier (default: interactive classes priority, batch ones flex)")
    add(g, "--priorities", type=int_mapping, default=None,
           help="class=int for --qos-mode priority (classes not given: tightest deadline first, from 0)")
    add(g, "--no-ignore-eos", action="store_true", help="let answers stop at EOS before max_tokens")
    add(g, "--vocab-size", type=at_least(101), default=None,
        help=f"random prompt ids of --endpoint completions are in [100, this) (default: {VOCAB_SIZE})")
    w = p.add_argument_group("workload")
    add(w, "--trace", default="azure_conv",
           help=f"lengths from a trace ({', '.join(TRACE_FILES)}, or a CSV path), or 'synthetic' "
           "with --input-len/--output-len (default: azure_conv)")
    add(w, "--input-len", type=positive_int, default=None, help="prompt tokens of --trace synthetic (default 128)")
    add(w, "--output-len", type=positive_int, default=None, help="output tokens of --trace synthetic (default 128)")
    add(w, "--cv", type=positive, default=None,
           help="burstiness of arrivals at a rate: gamma inter-arrivals with this coefficient of variation "
           "(default: 1, Poisson)")
    add(w, "--duration", type=positive, default=120.0,
           help="seconds of arrivals: rate × this requests, or the trace's own arrivals in that window "
           "(default: 120)")
    add(w, "--num-requests", type=positive_int, default=None, help="number of requests (overrides --duration)")
    add(w, "--class-mix", type=mix, default=None, help="e.g. interactive=1,batch-10m=1 (default: equal)")
    add(w, "--importance-mix", type=mix, default={"standard": 1.0},
           help="e.g. critical=0.4,standard=0.4,sheddable=0.2")
    add(w, "--length-scale", type=positive, default=1.0, help="multiply trace lengths (small models)")
    add(w, "--max-prompt-tokens", type=positive_int, default=None, help="clip longer prompts")
    add(w, "--qos-config", default=None,
           help="QoS classes the requests ask for and are judged by; use the server's file")
    add(w, "--seed", type=non_negative_int, default=0, help="seed of the workload and prompts (default: 0)")
    o = p.add_argument_group("output")
    add(o, "--output-dir", type=Path, default=Path("results/bench"), help="where files go (default: results/bench)")
    add(o, "--label", type=file_stem, default=None, help="file name stem (default: from the QoS mode and rate)")
    add(o, "--drain-timeout", type=positive, default=None,
           help="after the last arrival, cancel what still runs after this many seconds "
           "(cancelled requests count as violations)")
    add(o, "--stall-timeout", type=positive, default=600.0,
           help="a request whose stream sends nothing for this many seconds fails (a violation; "
           "default: 600)")
    add(o, "--goodput", type=threshold, nargs="+", action="extend", default=None, metavar="METRIC:MS",
        help="also count goodput as `vllm bench serve --goodput` does: requests within every given threshold "
        f"({', '.join(GOODPUT_METRICS)}; milliseconds) per second (with `bench capacity`, after `capacity`)")
    add(o, "--no-progress", action="store_true")
    return actions


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="load an OpenAI-compatible server and measure SLO attainment",
                              description="Open-loop load against any OpenAI-compatible server (Niyama, vLLM, "
                              "...): per-request JSONL, a per-class summary (JSON and table) and plots.")
    _add_args(p)
    p.add_argument("--rate", "--request-rate", type=positive, default=None,
                   help="arrivals per second (default: the trace's own arrival times)")
    p.set_defaults(func=cmd_bench)
    sub = p.add_subparsers(dest="bench_command", metavar="capacity")
    c = sub.add_parser("capacity", help="highest rate with ≤ 1%% violations in every class, on a live server",
                       description="The simulator's capacity search (bracket, bisect, interpolate) with each "
                       "point a live benchmark run.")
    for action in _add_args(c):  # options given before `capacity` must survive the subparser's defaults
        action.default = argparse.SUPPRESS
    c.add_argument("--start", type=positive, default=1.0, help="first rate tried, req/s (default: %(default)s)")
    c.add_argument("--tolerance", type=positive, default=0.05,
                   help="stop bisecting at this relative width (default: %(default)s)")
    c.add_argument("--threshold", type=percent, default=1.0,
                   help="violation %% allowed per class (default: %(default)s)")
    c.add_argument("--stop-at", type=percent, default=10.0,
                   help="end a point early once a class certainly has this %% of violations "
                   "(default: %(default)s)")
    c.set_defaults(func=cmd_capacity)


SYNTHETIC_LEN = 128  # --input-len and --output-len by default
VOCAB_SIZE = 32000  # --vocab-size by default


def check_options(args: argparse.Namespace, rate_searched: bool = False) -> None:
    """Options that only apply with another one: refused, rather than silently ignored, without it."""
    needs = [("--cv", args.cv, "--rate (the trace's own arrival times are replayed)",
              rate_searched or args.rate is not None),
             ("--vocab-size", args.vocab_size, "--endpoint completions", args.endpoint == "completions"),
             ("--service-tiers", args.service_tiers, "--qos-mode service-tier", args.qos_mode == "service-tier"),
             ("--priorities", args.priorities, "--qos-mode priority", args.qos_mode == "priority"),
             ("--input-len", args.input_len, "--trace synthetic", args.trace == "synthetic"),
             ("--output-len", args.output_len, "--trace synthetic", args.trace == "synthetic")]
    for option, value, other, given in needs:
        if value is not None and not given:
            raise ValueError(f"{option} applies only with {other}")
    unknown = [m for m, _ in args.goodput or () if m not in GOODPUT_METRICS]
    if unknown:
        raise ValueError(f"--goodput: unknown metric {unknown[0]!r} (known: {', '.join(GOODPUT_METRICS)})")


def workload(args: argparse.Namespace, classes: QoSClasses, rate: float | None) -> WorkloadSpec:
    synthetic = ((args.input_len or SYNTHETIC_LEN, args.output_len or SYNTHETIC_LEN) if args.trace == "synthetic"
                 else None)
    num = args.num_requests or (None if synthetic and not rate else requests_in(args.trace, args.duration, rate))
    return WorkloadSpec(trace=args.trace, rate=rate, num_requests=num, cv=args.cv or 1.0,
                        class_mix=args.class_mix or {n: 1.0 for n in classes}, importance_mix=args.importance_mix,
                        length_scale=args.length_scale, max_prompt_tokens=args.max_prompt_tokens,
                        synthetic_lengths=synthetic, seed=args.seed)


def config(args: argparse.Namespace, stop_at: float | None = None) -> BenchConfig:
    kwargs: dict[str, Any] = {"service_tiers": args.service_tiers} if args.service_tiers else {}
    return BenchConfig(base_url=args.base_url, model=args.model, endpoint=args.endpoint, qos_mode=args.qos_mode,
                       priorities=args.priorities, ignore_eos=not args.no_ignore_eos,
                       vocab_size=args.vocab_size or VOCAB_SIZE,
                       api_key=args.api_key, drain_timeout=args.drain_timeout, stall_timeout=args.stall_timeout,
                       stop_at_violation_pct=stop_at,
                       seed=args.seed, progress=not args.no_progress, **kwargs)


def save_run(run: RunResult, classes: QoSClasses, stem: Path, title: str,
             goodput: dict[str, float] | None = None) -> dict[str, Any]:
    """Write ``stem``.jsonl/.json/.png and return the summary (``goodput``: see ``run_summary``)."""
    from niyama.bench.results import run_rows, run_summary, write_jsonl
    from niyama.sim import plots

    rows = run_rows(run, classes)
    summary = run_summary(run, rows, goodput)
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(rows, Path(f"{stem}.jsonl"))
    Path(f"{stem}.json").write_text(json.dumps(summary, indent=2))
    plots.run_plot(rows, title, Path(f"{stem}.png"))
    return summary


def _all_failed(summary: dict[str, Any]) -> bool:
    sent = summary["overall"]["requests"]
    return bool(sent) and summary["errors"] == sent


def _check_any_succeeded(summary: dict[str, Any], stem: Path) -> None:
    """A run in which every request sent failed measured no server: stop with an error naming the first."""
    if _all_failed(summary):
        sent = summary["overall"]["requests"]
        first = summary["first_error"]
        raise ServerError(f"{'the request' if sent == 1 else f'all {sent} requests'} sent failed (first: {first}); "
                          f"see {stem}.jsonl")


def _stop_if_interrupted(summary: dict[str, Any], stem: Path) -> None:
    """After Ctrl-C, the partial results are saved: say where, then end as interrupted."""
    if summary["stop_reason"] == "interrupted":
        print(f"interrupted after {summary['overall']['requests']} of {summary['planned_requests']} requests were "
              f"sent; what they measured is in {stem}.jsonl and {stem}.json")
        raise KeyboardInterrupt


def cmd_bench(args: argparse.Namespace) -> None:
    from niyama.sim.report import format_summary

    check_options(args)
    classes = QoSClasses.load(args.qos_config)
    ensure_writable_dir(args.output_dir)
    specs = build_workload(workload(args, classes, args.rate))
    run = run_load(specs, classes, config(args))
    label = args.label or f"{args.qos_mode}-{args.rate or 'trace'}"
    stem = args.output_dir / f"bench-{label}"
    summary = save_run(run, classes, stem, f"{label}: {len(specs)} requests", dict(args.goodput or ()))
    _stop_if_interrupted(summary, stem)
    _check_any_succeeded(summary, stem)
    print(format_summary(summary))
    if summary["itl_p50"] is not None:
        print("ITL p50/p90/p99 " + "/".join(f"{summary[f'itl_p{p}'] * 1e3:.1f}" for p in (50, 90, 99)) + " ms")
    if "goodput_thresholds_rps" in summary:
        within = ", ".join(f"{m} ≤ {v:g} ms" for m, v in summary["goodput_thresholds_ms"].items())
        print(f"goodput ({within}) {summary['goodput_thresholds_rps']:.2f} req/s")
    if other := summary["served_as_other_class"]:
        print("the server applied another class than asked (requests are judged by the class asked): "
              + ", ".join(f"{pair} ({n})" for pair, n in other.items()))
    if summary["errors"]:
        print(f"{summary['errors']} requests failed (counted as violations); see {stem}.jsonl")
    if summary["cancelled"]:
        print(f"{summary['cancelled']} requests were still running at the drain timeout and were cut off")
    print(f"wrote {stem}.jsonl, {stem}.json, {stem}.png")


def find_live_capacity(args: argparse.Namespace, classes: QoSClasses, out_dir: Path, label: str,
                       turn: Callable[[], AbstractContextManager[object]] = nullcontext):
    """The capacity search against the server at ``args.base_url``; each point's files go to ``out_dir``.
    Each point runs inside ``turn()``: searches in threads can take turns point by point with it."""
    from niyama.sim.capacity import find_capacity
    from niyama.sim.report import max_class_violation

    check_options(args, rate_searched=True)
    if args.stop_at <= args.threshold:
        raise ValueError(f"--stop-at ({args.stop_at}) must be above --threshold ({args.threshold})")
    runs: list[dict[str, Any]] = []
    bench = config(args, stop_at=args.stop_at)
    if bench.drain_timeout is None:  # by then every request's SLO is decided; what still runs is cut off
        bench = replace(bench, drain_timeout=max(q.first_token_deadline(0.0) for q in classes.values()))

    def evaluate(rate: float) -> float:
        specs = build_workload(workload(args, classes, rate))
        with turn():
            started = time.time()
            run = run_load(specs, classes, bench)
        stem = out_dir / f"{label}-{len(runs):02d}-{rate:.4g}"
        summary = save_run(run, classes, stem, f"{label} at {rate:.4g} req/s", dict(args.goodput or ()))
        _stop_if_interrupted(summary, stem)
        if all(_all_failed(r["summary"]) for r in runs):  # once the server has served, failures under
            _check_any_succeeded(summary, stem)  # load (429s, say) are its violations, not an error
        # A run ended for its violations proved at least ``stop_at`` % in some class: report that bound.
        early = run.stop_reason == "violations"
        worst = args.stop_at if early else max_class_violation(summary)
        runs.append({"rate": rate, "worst_violation_pct": worst, "stopped_early": early, "started": started,
                     "summary": summary})
        print(f"{label}: {rate:.4g} req/s → worst class {'≥ ' if early else ''}{worst:.1f}% violations", flush=True)
        return worst

    result = find_capacity(evaluate, start=args.start, threshold=args.threshold, rel_tol=args.tolerance)
    return result, runs


def cmd_capacity(args: argparse.Namespace) -> None:
    from niyama.sim import plots

    if args.rate is not None:
        raise ValueError("--rate does not apply to bench capacity, which searches the rate (see --start)")
    classes = QoSClasses.load(args.qos_config)
    label = args.label or f"capacity-{args.qos_mode}"
    ensure_writable_dir(args.output_dir)
    result, runs = find_live_capacity(args, classes, args.output_dir / label, label)
    path = args.output_dir / f"{label}.json"
    path.write_text(json.dumps({"capacity": result.capacity, "at_least": result.at_least, "threshold": result.threshold,
                                "points": runs,
                                "args": {k: str(v) for k, v in vars(args).items() if k != "func"}}, indent=2))
    plot = plots.capacity_plot({args.trace: {label: result}}, args.output_dir / f"{label}.png")
    print(f"capacity {result}; wrote {path}, {plot}")
