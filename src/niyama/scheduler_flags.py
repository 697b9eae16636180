"""Command-line switches of Niyama's mechanisms, shared by the simulator's commands and ``niyama serve``."""

from __future__ import annotations

import argparse
from typing import Any

from niyama.argtypes import non_negative
from niyama.scheduler.base import SchedulerConfig


def add_niyama_switches(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alpha", type=non_negative, default=SchedulerConfig.hybrid_alpha,
                   help=f"Niyama hybrid α (s/token; default {SchedulerConfig.hybrid_alpha}); 0 = EDF order")
    p.add_argument("--no-dynamic-chunking", action="store_true", help="Niyama: a fixed token budget (ablation)")
    p.add_argument("--no-relegation", action="store_true", help="Niyama: never relegate (ablation)")


def niyama_switches(args: argparse.Namespace) -> dict[str, Any]:
    """The ``SchedulerConfig`` fields the switches set."""
    return {"hybrid_alpha": args.alpha, "dynamic_chunking": not args.no_dynamic_chunking,
            "relegation": not args.no_relegation}
