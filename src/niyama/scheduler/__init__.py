"""Schedulers behind one interface, by name: fcfs, edf, srpf, priority, niyama."""

from __future__ import annotations

from niyama.memory import KVBlockManager
from niyama.predictor import BatchTimePredictor
from niyama.scheduler.base import Scheduler, SchedulerConfig
from niyama.scheduler.baselines import PriorityScheduler, SRPFScheduler
from niyama.scheduler.batch import Batch
from niyama.scheduler.deadline import DeadlineScheduler, EDFScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {
    "fcfs": Scheduler,
    "edf": EDFScheduler,
    "srpf": SRPFScheduler,
    "priority": PriorityScheduler,
    "niyama": DeadlineScheduler,
}

__all__ = ["SCHEDULERS", "Batch", "Scheduler", "SchedulerConfig", "make_scheduler"]


def make_scheduler(name: str, config: SchedulerConfig, kv: KVBlockManager,
                   predictor: BatchTimePredictor | None = None) -> Scheduler:
    """Build a scheduler by name; ``niyama`` takes its three switches from ``config``."""
    try:
        cls = SCHEDULERS[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r} (known: {', '.join(SCHEDULERS)})") from None
    return cls(config, kv, predictor)
