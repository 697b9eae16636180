"""Baseline prompt orders with a fixed token budget: SRPF and vLLM-style strict priority.

FCFS (Sarathi-Serve) is the base ``Scheduler`` itself; EDF lives with Niyama in ``deadline.py``.
"""

from __future__ import annotations

from niyama.request import Request
from niyama.scheduler.base import Scheduler, SortKey


class SRPFScheduler(Scheduler):
    """Shortest remaining prompt first."""

    name = "srpf"

    def waiting_key(self, request: Request) -> SortKey:
        return request.prefill_remaining

    def running_key(self, request: Request, now: float) -> SortKey:
        return request.prefill_remaining


class PriorityScheduler(Scheduler):
    """vLLM's ``--scheduling-policy priority``: lower integer first, FCFS within a level."""

    name = "priority"

    def waiting_key(self, request: Request) -> SortKey:
        return (request.priority, request.arrival)
