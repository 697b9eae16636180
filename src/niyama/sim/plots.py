"""PNG plots for simulation runs and experiments (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from niyama.sim.capacity import CapacityResult  # noqa: E402


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_plot(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    """TTFT distribution per class, and violations over time (``rows``: per-request report rows)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    by_class: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_class.setdefault(r["class"], []).append(r)
    for name, group in sorted(by_class.items()):
        ttft = np.sort([r["ttft"] for r in group if r["ttft"] is not None])
        if ttft.size:
            ax1.plot(ttft, np.arange(1, ttft.size + 1) / ttft.size, label=name)
    ax1.set_xscale("log")
    ax1.set_xlabel("time to first token (s)")
    ax1.set_ylabel("fraction of requests")
    ax1.set_title("TTFT CDF per class")
    if ax1.lines:
        ax1.legend()
    arrivals = np.array([r["arrival"] for r in rows])
    missed = np.array([r["slo_met"] is not True for r in rows], dtype=float)
    if arrivals.size:
        bins = np.linspace(arrivals.min(), arrivals.max() + 1e-9, 40)
        idx = np.digitize(arrivals, bins)
        share = [100 * missed[idx == i].mean() if (idx == i).any() else 0 for i in range(1, len(bins))]
        ax2.plot(bins[:-1], share, drawstyle="steps-post")
    ax2.set_xlabel("arrival time (s)")
    ax2.set_ylabel("SLO violations (%)")
    ax2.set_title("violations by arrival time")
    fig.suptitle(title)
    return _save(fig, path)


def capacity_plot(results: dict[str, dict[str, CapacityResult]], path: Path) -> Path:
    """Left: capacity per trace and scheduler. Right: the search points (violations vs rate)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    traces = list(results)
    variants = list(next(iter(results.values()))) if results else []
    width = 0.8 / max(len(variants), 1)
    for j, v in enumerate(variants):
        caps = [results[t][v].capacity for t in traces]
        bars = ax1.bar(np.arange(len(traces)) + j * width, caps, width, label=v)
        ax1.bar_label(bars, fmt="%.2f", fontsize=8)
    ax1.set_xticks(np.arange(len(traces)) + width * (len(variants) - 1) / 2, traces)
    ax1.set_ylabel("capacity (req/s at ≤ 1% violations per class)")
    ax1.legend()
    for t in traces:
        for v in variants:
            pts = sorted(results[t][v].points)
            ax2.plot([p[0] for p in pts], [max(p[1], 0.01) for p in pts], marker="o", label=f"{t} {v}")
    ax2.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax2.set_yscale("log")
    ax2.set_xlabel("arrival rate (req/s)")
    ax2.set_ylabel("worst class violations (%)")
    ax2.legend(fontsize=7)
    return _save(fig, path)


def overload_plot(results: dict[str, list[dict[str, Any]]], capacity: float, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v, summaries in results.items():
        x = [s["point"]["rate"] / capacity for s in summaries]
        ax.plot(x, [s["overall"]["violation_pct"] for s in summaries], marker="o", label=v)
    ax.set_xlabel(f"load (× Niyama capacity, {capacity:.2f} req/s)")
    ax.set_ylabel("SLO violations, all requests (%)")
    ax.legend()
    return _save(fig, path)


def grouped_bars(data: dict[str, dict[str, float]], ylabel: str, path: Path, title: str = "") -> Path:
    """``data[group][series]`` as grouped bars, e.g. violations per scheduler and importance."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    groups = list(data)
    series = sorted({k for d in data.values() for k in d})
    width = 0.8 / max(len(series), 1)
    for j, name in enumerate(series):
        bars = ax.bar(np.arange(len(groups)) + j * width, [data[g].get(name, 0.0) for g in groups], width,
                      label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(np.arange(len(groups)) + width * (len(series) - 1) / 2, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)
