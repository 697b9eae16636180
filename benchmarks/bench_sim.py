"""Simulator and scheduler speed (issue 2's targets; not a test, numbers go to docs/benchmarks.md).

1. Simulating 10,000 Azure Code requests near Niyama's capacity: target ≤ 10 s wall.
2. One Niyama scheduling decision with 1,000 waiting requests: target ≤ 1 ms.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from niyama.memory import KVBlockManager
from niyama.predictor import BatchTimePredictor
from niyama.qos import QoSClasses
from niyama.request import Request
from niyama.scheduler import SchedulerConfig, make_scheduler
from niyama.sim.simulator import SimConfig, simulate
from niyama.sim.workload import WorkloadSpec, build_workload


def bench_simulation(rate: float, scheduler: str) -> float:
    specs = build_workload(WorkloadSpec(trace="azure_code", rate=rate, num_requests=10_000, seed=1))
    start = time.perf_counter()
    result = simulate(specs, QoSClasses.load(), SimConfig(scheduler))
    wall = time.perf_counter() - start
    print(f"simulate 10,000 azure_code requests at {rate} req/s with {scheduler}: {wall:.2f} s wall "
          f"({result.iterations} iterations, {result.duration:.0f} s simulated)")
    return wall


def _scheduler_with(waiting: int, rng: np.random.Generator):
    """A ``niyama`` scheduler whose queue holds ``waiting`` requests arrived at time 0, and a function that
    adds one more request (classes in turn, A100 profile) at a given time."""
    classes = QoSClasses.load()
    names = list(classes)
    scheduler = make_scheduler("niyama", SchedulerConfig(), KVBlockManager(400_000 // 16, 16),
                               BatchTimePredictor.load("a100-llama3-8b"))
    counter = 0

    def add(now: float) -> None:
        nonlocal counter
        qos = classes[names[counter % len(names)]]
        scheduler.add(Request(f"b{counter}", now, qos, int(rng.integers(100, 4000)), int(rng.integers(10, 400))))
        counter += 1

    for _ in range(waiting):
        add(0.0)
    return scheduler, add


def bench_first_decision(waiting: int, repeats: int) -> list[float]:
    """The first decision after ``waiting`` requests arrive at once, and the decisions until its relegation
    walk has visited the whole queue, timed on ``repeats`` fresh queues of the same requests: one sample
    is at the mercy of this VM's drift."""
    first, whole = [], []
    for _ in range(repeats):
        scheduler, _ = _scheduler_with(waiting, np.random.default_rng(0))
        now, walk_ms = 0.0, []
        while not walk_ms or scheduler.walking:
            start = time.perf_counter()
            batch = scheduler.schedule(now)
            walk_ms.append((time.perf_counter() - start) * 1e3)
            now += scheduler.predictor.predict_shape(batch.shape())
            scheduler.update(batch, now)
        first.append(walk_ms[0])
        whole.append(sum(walk_ms))
    for ms in (first, whole):
        ms.sort()
    print(f"first decision ({waiting} arrived at once), {repeats} fresh queues: min {first[0]:.3f} ms, "
          f"median {statistics.median(first):.3f} ms, max {first[-1]:.3f} ms")
    print(f"  its relegation walk ends at decision {len(walk_ms)} ({scheduler.num_relegated} relegated); "
          f"those decisions together: min {whole[0]:.3f} ms, median {statistics.median(whole):.3f} ms, "
          f"max {whole[-1]:.3f} ms")
    return first


def bench_decision(waiting: int, decisions: int) -> list[float]:
    """Time schedule() with ``waiting`` queued requests, topping the queue up as requests start."""
    scheduler, add = _scheduler_with(waiting, np.random.default_rng(0))
    predictor = scheduler.predictor
    now = 0.0
    walks, others = [], []  # decisions that take a relegation walk a step, and the rest
    for _ in range(decisions):
        walk_due = scheduler.walk_due(now)
        start = time.perf_counter()
        batch = scheduler.schedule(now)
        elapsed = (time.perf_counter() - start) * 1e3
        (walks if walk_due else others).append(elapsed)
        now += predictor.predict_shape(batch.shape())
        scheduler.update(batch, now)
        while scheduler.num_waiting + scheduler.num_relegated < waiting:
            add(now)
    ms = sorted(walks + others)
    print(f"schedule() with {waiting} waiting, {decisions} decisions: mean {statistics.mean(ms):.3f} ms, "
          f"p50 {ms[len(ms) // 2]:.3f} ms, p99 {ms[int(len(ms) * 0.99)]:.3f} ms, max {ms[-1]:.3f} ms")
    for name, part in (("that take the relegation walk a step", walks), ("without it", others)):
        part.sort()
        print(f"  {len(part)} decisions {name}: mean {statistics.mean(part):.3f} ms, max {part[-1]:.3f} ms")
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=5.0, help="near Niyama's Azure Code capacity")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}")
    for scheduler in ("fcfs", "edf", "niyama"):
        bench_simulation(args.rate, scheduler)
    bench_first_decision(1000, 20)
    bench_decision(1000, 2000)


if __name__ == "__main__":
    main()
