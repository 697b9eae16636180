"""The paper's experiments on the simulator: capacity, overload, transient load, ablation, silos.

Every experiment is a set of independent simulation runs (``Point``), farmed out to worker processes,
and returns plain data that ``niyama.sim.plots`` draws and the CLI prints.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing import Pool
from typing import Any, TypeVar

from tqdm import tqdm

from niyama.predictor import BatchTimePredictor
from niyama.qos import QoSClasses
from niyama.scheduler import SchedulerConfig
from niyama.sim.capacity import CapacityResult, find_capacity
from niyama.sim.report import max_class_violation, request_row, summarize
from niyama.sim.simulator import SimConfig, simulate
from niyama.sim.workload import WorkloadSpec, build_workload

# Named scheduler variants: (scheduler name, SchedulerConfig overrides).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fcfs": ("fcfs", {}),
    "edf": ("edf", {}),
    "srpf": ("srpf", {}),
    "priority": ("priority", {}),
    "niyama": ("niyama", {}),
    "edf+dc": ("niyama", {"relegation": False, "hybrid_alpha": 0.0}),
    "edf+dc+rel": ("niyama", {"hybrid_alpha": 0.0}),
    "fcfs-256": ("fcfs", {"chunk_size": 256}),
    "fcfs-2048": ("fcfs", {"chunk_size": 2048}),
}
ABLATION = ("edf", "edf+dc", "edf+dc+rel", "niyama")


@dataclass
class Setup:
    """What every run of an experiment shares."""

    trace: str = "azure_code"
    duration: float = 3600.0  # seconds of arrivals per run (requests = rate × duration)
    profile: str = "a100-llama3-8b"
    noise: float = 0.05
    qos_config: str | None = None
    class_mix: dict[str, float] | None = None
    importance_mix: dict[str, float] = field(default_factory=lambda: {"standard": 1.0})
    length_scale: float = 1.0
    base_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    seed: int = 1
    workers: int = max(1, min(os.cpu_count() or 1, 4))


@dataclass(frozen=True)
class Point:
    variant: str
    rate: float = 0.0
    schedule: tuple[tuple[float, float], ...] = ()
    replicas: int = 1  # round-robin over this many replicas; the requests are split accordingly
    classes: tuple[str, ...] = ()  # only these QoS classes (a silo); empty = all


def variant_config(setup: Setup, variant: str) -> tuple[str, SchedulerConfig]:
    try:
        name, overrides = VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown scheduler {variant!r} (known: {', '.join(VARIANTS)})") from None
    return name, replace(setup.base_config, **overrides)


def run_point(setup: Setup, point: Point) -> dict[str, Any]:
    """Simulate one point and return its summary (all replicas' requests together)."""
    classes = QoSClasses.load(setup.qos_config)
    mix = setup.class_mix or {name: 1.0 for name in classes}
    spec = WorkloadSpec(trace=setup.trace, rate=point.rate or None, schedule=point.schedule,
                        num_requests=max(1, int(point.rate * setup.duration)) if point.rate else None,
                        class_mix=mix, importance_mix=setup.importance_mix,
                        length_scale=setup.length_scale, seed=setup.seed)
    specs = build_workload(spec)
    if point.classes:
        specs = [s for s in specs if s.qos_class in point.classes]
    name, config = variant_config(setup, point.variant)
    latency = BatchTimePredictor.load(setup.profile)
    requests, duration = [], 0.0
    for k in range(point.replicas):
        result = simulate(specs[k::point.replicas], classes,
                          SimConfig(name, config, latency, noise=setup.noise, seed=setup.seed + k))
        requests += result.requests
        duration = max(duration, result.duration)
    summary = summarize([request_row(r) for r in requests], duration)
    summary["point"] = {"variant": point.variant, "rate": point.rate, "replicas": point.replicas}
    return summary


T = TypeVar("T")


def in_parallel(workers: int, calls: Sequence[tuple[Callable[..., T], tuple[Any, ...]]], desc: str,
                unit: str) -> list[T]:
    """The results of ``calls`` (function, arguments) in order, computed by at most ``workers`` processes,
    with a progress bar. Leaving early (Ctrl-C, an error) kills the workers instead of waiting for the
    runs still queued, which can take hours."""
    if workers <= 1 or len(calls) <= 1:
        return [fn(*args) for fn, args in tqdm(calls, desc=desc, unit=unit)]
    with Pool(min(workers, len(calls)), _ignore_sigint) as pool:  # leaving the block terminates the workers
        pending = [pool.apply_async(fn, args) for fn, args in calls]
        return [p.get() for p in tqdm(pending, desc=desc, unit=unit)]


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the main process, which terminates them (no traceback from each)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_points(setup: Setup, points: Sequence[Point], desc: str) -> list[dict[str, Any]]:
    """Run points in parallel worker processes, with a progress bar; results in input order."""
    return in_parallel(setup.workers, [(run_point, (setup, p)) for p in points], desc, "run")


# -- experiments -------------------------------------------------------------------------------------
def capacity(setup: Setup, variant: str, start: float = 2.0,
             log: Callable[[str], None] | None = None) -> CapacityResult:
    def evaluate(rate: float) -> float:
        return max_class_violation(run_point(setup, Point(variant, rate)))

    def on_point(rate: float, v: float) -> None:
        if log:
            log(f"  {setup.trace} {variant}: {rate:.3f} req/s → worst class {v:.2f}% violations")

    return find_capacity(evaluate, start=start, on_point=on_point)


def capacities(setup: Setup, variants: Iterable[str], start: float = 2.0) -> dict[str, CapacityResult]:
    """Capacity of several variants, each search in its own worker process."""
    variants = list(variants)
    found = in_parallel(setup.workers, [(capacity, (setup, v, start)) for v in variants],
                        f"capacity {setup.trace}", "scheduler")
    return dict(zip(variants, found, strict=True))


def overload(setup: Setup, variants: Sequence[str], rates: Sequence[float]
             ) -> dict[str, list[dict[str, Any]]]:
    points = [Point(v, r) for v in variants for r in rates]
    results = run_points(setup, points, f"overload {setup.trace}")
    return {v: [s for p, s in zip(points, results, strict=True) if p.variant == v] for v in variants}


def transient(setup: Setup, variants: Sequence[str], low: float, high: float, period: float,
              total: float) -> dict[str, dict[str, Any]]:
    phases = int(total // period)
    schedule = tuple((period, low if i % 2 == 0 else high) for i in range(phases))
    results = run_points(setup, [Point(v, schedule=schedule) for v in variants], f"transient {setup.trace}")
    return dict(zip(variants, results, strict=True))


def replicas_needed(setup: Setup, variant: str, rate: float, classes: tuple[str, ...] = (), start: int = 1,
                    max_replicas: int = 256) -> tuple[int, list[tuple[int, float]]]:
    """Fewest round-robin replicas that keep every class at ≤ 1% violations at aggregate ``rate``.

    The search starts from a guess (deeply overloaded probes are the slow ones to simulate), halves while
    it passes, doubles while it fails, then bisects."""
    tried: list[tuple[int, float]] = []

    def passes(n: int) -> bool:
        v = max_class_violation(run_point(setup, Point(variant, rate, replicas=n, classes=classes)))
        tried.append((n, v))
        return v <= 1.0

    lo, hi = 0, start  # lo fails (0 replicas always does), hi passes
    if passes(start):
        while hi > 1 and passes(hi // 2):
            hi //= 2
        lo = hi // 2
    else:
        lo, hi = start, start * 2
        while not passes(hi):
            lo, hi = hi, hi * 2
            if hi > max_replicas:
                raise RuntimeError(f"{variant} needs more than {max_replicas} replicas")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    return hi, sorted(tried)


def silos(setup: Setup, rate: float, shared_guess: int = 1) -> dict[str, Any]:
    """Replicas for per-class pools (FCFS, chunk 256 for interactive and 2048 for batch) versus one
    shared Niyama pool, at the same aggregate rate; ``shared_guess`` starts the shared pool's search."""
    classes = QoSClasses.load(setup.qos_config)
    jobs: dict[str, tuple[str, tuple[str, ...], int]] = {"shared niyama": ("niyama", (), shared_guess)}
    for name, qos in classes.items():
        if setup.class_mix is None or setup.class_mix.get(name, 0) > 0:  # a class with no requests needs no pool
            jobs[f"silo {name}"] = ("fcfs-256" if qos.interactive else "fcfs-2048", (name,), 1)
    results = in_parallel(setup.workers, [(replicas_needed, (setup, v, rate, c, n)) for v, c, n in jobs.values()],
                          f"silos {setup.trace}", "pool")
    found = dict(zip(jobs, results, strict=True))
    siloed = sum(n for k, (n, _) in found.items() if k.startswith("silo"))
    shared = found["shared niyama"][0]
    return {"rate": rate, "pools": {k: {"replicas": n, "tried": t} for k, (n, t) in found.items()},
            "siloed_total": siloed, "shared_total": shared, "saving_pct": 100.0 * (1 - shared / siloed)}
