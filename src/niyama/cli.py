"""The ``niyama`` command: the simulator and its experiments here; the engine, the server and the benchmark
client register their own subcommands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

from niyama import __version__
from niyama.argtypes import (
    ensure_writable_dir,
    mix,
    non_negative,
    non_negative_int,
    output_file,
    positive,
    positive_int,
)
from niyama.predictor import builtin_profiles
from niyama.qos import QoSClasses
from niyama.scheduler import SchedulerConfig
from niyama.scheduler_flags import add_niyama_switches, niyama_switches
from niyama.sim.workload import TRACE_FILES, load_trace


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default="azure_code",
                   help=f"trace name ({', '.join(TRACE_FILES)}) or a CSV path (default: azure_code)")
    p.add_argument("--duration", type=positive, default=3600.0,
                   help="seconds of arrivals per run: rate × duration requests, or the trace's own "
                        "arrivals in that window (default: 3600)")
    p.add_argument("--class-mix", type=mix, default=None,
                   help="QoS class weights, e.g. interactive=1,batch-10m=1 (default: equal over classes)")
    p.add_argument("--importance-mix", type=mix, default={"standard": 1.0},
                   help="importance weights, e.g. critical=0.4,standard=0.4,sheddable=0.2")
    p.add_argument("--length-scale", type=positive, default=1.0, help="multiply prompt and output lengths")
    p.add_argument("--profile", default="a100-llama3-8b",
                   help=f"latency profile: built-in ({', '.join(builtin_profiles())}) or a JSON path")
    p.add_argument("--noise", type=non_negative, default=0.05, help="std of multiplicative batch-time noise")
    p.add_argument("--qos-config", default=None, help="QoS class file (TOML); default: the paper's classes")
    p.add_argument("--seed", type=non_negative_int, default=1,
                   help="seed of the workload and the noise (default: %(default)s)")
    p.add_argument("--chunk-size", type=positive_int, default=256,
                   help="token budget of fixed-budget schedulers (default: %(default)s)")
    add_niyama_switches(p)
    p.add_argument("--output-dir", type=Path, default=Path("results"),
                   help="where CSV/JSON/PNG go (default: %(default)s)")


def _add_workers_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=positive_int, default=2,
                   help="simulations run in parallel processes (default: %(default)s)")


def _setup(args: argparse.Namespace):
    from niyama.sim.experiments import Setup

    QoSClasses.load(args.qos_config)  # fail early on a bad file or trace, not after a long run
    if args.trace not in TRACE_FILES:  # a CSV path (or a misspelt name); the named ones load at the first run
        load_trace(args.trace)
    config = SchedulerConfig(chunk_size=args.chunk_size, **niyama_switches(args))
    ensure_writable_dir(args.output_dir)
    return Setup(trace=args.trace, duration=args.duration, profile=args.profile, noise=args.noise,
                 qos_config=args.qos_config, class_mix=args.class_mix, importance_mix=args.importance_mix,
                 length_scale=args.length_scale, base_config=config, seed=args.seed,
                 workers=getattr(args, "workers", 1))


def cmd_simulate(args: argparse.Namespace) -> None:
    from niyama.predictor import BatchTimePredictor
    from niyama.sim import plots
    from niyama.sim.experiments import variant_config
    from niyama.sim.report import format_summary, request_row, summarize, write_rows
    from niyama.sim.simulator import SimConfig, simulate
    from niyama.sim.workload import WorkloadSpec, build_workload, requests_in

    setup = _setup(args)
    classes = QoSClasses.load(args.qos_config)
    num = args.num_requests or requests_in(args.trace, args.duration, args.rate)
    spec = WorkloadSpec(trace=args.trace, rate=args.rate, num_requests=num,
                        class_mix=args.class_mix or {n: 1.0 for n in classes},
                        importance_mix=args.importance_mix, length_scale=args.length_scale, seed=args.seed)
    specs = build_workload(spec)
    name, config = variant_config(setup, args.scheduler)
    result = simulate(specs, classes, SimConfig(name, config, BatchTimePredictor.load(args.profile),
                                                noise=args.noise, seed=args.seed), progress=True)
    rows = [request_row(r) for r in result.requests]
    summary = summarize(rows, result.duration)
    stem = args.output_dir / f"sim-{Path(args.trace).stem}-{args.scheduler}"
    write_rows(rows, f"{stem}.csv")
    Path(f"{stem}.json").write_text(json.dumps(summary, indent=2))
    plot = plots.run_plot(rows, f"{args.scheduler} on {args.trace}", Path(f"{stem}.png"))
    print(format_summary(summary))
    print(f"{result.iterations} iterations, {result.num_preemptions} preemptions; "
          f"wrote {stem}.csv, {stem}.json, {plot}")


def cmd_capacity(args: argparse.Namespace) -> None:
    from niyama.sim import plots
    from niyama.sim.experiments import capacities

    setup = _setup(args)
    results = {args.trace: capacities(setup, args.schedulers, start=args.start)}
    for variant, res in results[args.trace].items():
        points = ", ".join(f"{r:.2f}→{v:.1f}%" for r, v in res.points)
        print(f"{variant:<12} capacity {res!s:>12}   ({points})")
    path = plots.capacity_plot(results, args.output_dir / f"capacity-{Path(args.trace).stem}.png")
    print(f"wrote {path}")


def cmd_experiment(args: argparse.Namespace) -> None:
    from niyama.sim import reproduce

    if args.name == "capacity" and args.trace not in reproduce.CAPACITY_TRACES:
        raise ValueError(f"experiment capacity always measures {' and '.join(reproduce.CAPACITY_TRACES)}; "
                         "--trace chooses the trace of ablation, overload, transient and silos")
    setup = _setup(args)
    reproduce.run(args.name, setup, args.output_dir, report=args.report)


class _Parser(argparse.ArgumentParser):
    """Errors in one line (``niyama simulate: error: …``) instead of argparse's usage block; ``--help``
    still shows the usage. Subcommand parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from niyama.sim.experiments import VARIANTS

    parser = _Parser(prog="niyama", description="Niyama: QoS-driven LLM serving (serve, bench) and its "
                     "simulator (simulate, capacity, experiment).")
    parser.add_argument("--version", action="version", version=f"niyama {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="simulate one workload with one scheduler")
    _add_workload_args(p)
    p.add_argument("--scheduler", default="niyama", choices=list(VARIANTS))
    p.add_argument("--rate", type=positive, default=None, help="Poisson rate (default: trace arrival times)")
    p.add_argument("--num-requests", type=positive_int, default=None, help="number of requests (overrides duration)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("capacity", help="max rate with ≤ 1%% violations per class, per scheduler")
    _add_workload_args(p)
    _add_workers_arg(p)
    p.add_argument("--schedulers", type=_scheduler_list, default="fcfs,edf,niyama",
                   help=f"comma-separated, of: {', '.join(VARIANTS)} (default: %(default)s)")
    p.add_argument("--start", type=positive, default=2.0, help="first rate tried, req/s (default: %(default)s)")
    p.set_defaults(func=cmd_capacity)

    p = sub.add_parser("experiment", help="the paper's experiments: capacity, overload, transient, "
                                          "ablation, silos, or all",
                       description="Run one of the paper's experiments, or all. --duration sets each run's "
                       "arrivals, except for transient, which always runs its 4 hours of 15-minute phases.")
    p.add_argument("name", choices=["capacity", "overload", "transient", "ablation", "silos", "all"],
                   help="capacity always measures azure_code and azure_conv; the others run on --trace")
    _add_workload_args(p)
    _add_workers_arg(p)
    p.add_argument("--report", type=output_file, default=None, help="also write a Markdown report here")
    p.set_defaults(func=cmd_experiment)

    from niyama.bench.commands import register as register_bench
    from niyama.engine.commands import register as register_engine
    from niyama.server.commands import register as register_server

    register_engine(sub)
    register_server(sub)
    register_bench(sub)
    return parser


def _scheduler_list(text: str) -> list[str]:
    """``fcfs,edf,...`` → the names, each once, all known."""
    from niyama.sim.experiments import VARIANTS

    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise argparse.ArgumentTypeError("no scheduler given")
    if unknown := [n for n in names if n not in VARIANTS]:
        raise argparse.ArgumentTypeError(f"unknown scheduler(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    return names


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # seconds of imports (torch): Ctrl-C may come here too
        args.func(args)
    except BrokenPipeError:  # the reader left (`niyama generate ... | head -1`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or Python's exit flush complains
        return 141
    except (ValueError, FileNotFoundError, OSError) as e:
        _end_progress_bars()
        print(f"niyama: error: {e}", file=sys.stderr)
        return 2
    except (ArithmeticError, MemoryError) as e:  # e.g. --duration 1e308: numbers too large to work with
        _end_progress_bars()
        print(f"niyama: error: a value is out of range ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # With no bar to close, a terminal's cursor is likely mid-line: after its "^C", or after a bar that
        # Ctrl-C caught while it was being built (it is then gone without its closing newline).
        newline = "" if _end_progress_bars() or not sys.stderr.isatty() else "\n"
        print(f"{newline}niyama: interrupted", file=sys.stderr)
        return 130
    return 0


def _end_progress_bars() -> bool:
    """Close progress bars left open by an error, so that the message starts on a line of its own; whether
    there was one."""
    from tqdm import tqdm

    bars = list(getattr(tqdm, "_instances", ()))
    for bar in bars:
        bar.close()
    return bool(bars)


if __name__ == "__main__":
    sys.exit(main())
