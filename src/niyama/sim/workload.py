"""Workloads for simulation and benchmarks: trace lengths, arrival processes, QoS and importance mixes."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from niyama.qos import Importance

TRACE_FILES = {
    "azure_code": "azure_code_2023.csv",
    "azure_conv": "azure_conv_2023.csv",
    "sharegpt": "sharegpt_lengths.csv",
}
MAX_TRACE_TOKENS = 10_000_000  # a token count beyond any context: a corrupt row, not a request
MAX_REQUESTS = 10_000_000  # in one workload (~3 GB of request objects): a typo in a rate or duration
DEFAULT_CLASS_MIX = {"interactive": 1 / 3, "batch-10m": 1 / 3, "batch-30m": 1 / 3}


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request of a workload: when it arrives, how long it is, which QoS it asks for."""

    arrival: float
    prompt_tokens: int
    decode_tokens: int
    qos_class: str
    importance: Importance = Importance.STANDARD


@dataclass
class Trace:
    prompt_tokens: np.ndarray
    decode_tokens: np.ndarray
    arrivals: np.ndarray | None  # seconds from the trace's start; None when the trace has no times

    def __len__(self) -> int:
        return len(self.prompt_tokens)


def trace_dir() -> Path:
    """``shared/data/traces`` beside the project root (or ``$NIYAMA_TRACE_DIR``)."""
    if env := os.environ.get("NIYAMA_TRACE_DIR"):
        return Path(env)
    for base in (Path.cwd(), *Path(__file__).resolve().parents):
        candidate = base.parent / "shared" / "data" / "traces"
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("cannot find shared/data/traces beside the project; set NIYAMA_TRACE_DIR")


def load_trace(name_or_path: str) -> Trace:
    """A trace by name (``azure_code``, ``azure_conv``, ``sharegpt``) or a CSV path with the columns
    ``num_prefill_tokens``, ``num_decode_tokens`` and optionally ``arrived_at``."""
    path = trace_dir() / TRACE_FILES[name_or_path] if name_or_path in TRACE_FILES else Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"no trace {name_or_path!r} (known: {', '.join(TRACE_FILES)}, or a CSV path)")
    try:
        with path.open(encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark is not a column name
            header = f.readline().strip().split(",")
    except UnicodeDecodeError as e:
        raise ValueError(f"trace {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    col = {name: i for i, name in enumerate(header)}
    for needed in ("num_prefill_tokens", "num_decode_tokens"):
        if needed not in col:
            raise ValueError(f"trace {path} has no {needed} column")
    try:
        with warnings.catch_warnings(action="ignore"):  # "input contained no data": reported below
            data = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"trace {path}: {_loadtxt_error(e)}") from None
    if len(data) == 0:
        raise ValueError(f"trace {path} has no rows")
    if data.shape[1] != len(header):
        raise ValueError(f"trace {path}: its rows have {data.shape[1]} columns, its header {len(header)}")
    used = [col[c] for c in ("num_prefill_tokens", "num_decode_tokens", "arrived_at") if c in col]
    checks = [(~np.isfinite(data).all(axis=1), "row {} holds a value that is not a finite number"),
              ((data[:, used] < 0).any(axis=1), "row {} holds a negative value"),
              ((data[:, [col["num_prefill_tokens"], col["num_decode_tokens"]]] > MAX_TRACE_TOKENS).any(axis=1),
               f"row {{}} holds a token count above {MAX_TRACE_TOKENS:,}")]
    if "arrived_at" in col:
        checks.append((np.diff(data[:, col["arrived_at"]], prepend=-np.inf) < 0,
                       "arrived_at goes back in time at row {} (rows must be in arrival order)"))
    for bad, message in checks:  # in order: a NaN row is reported as such, not as a negative one
        if bad.any():
            raise ValueError(f"trace {path}: " + message.format(int(np.flatnonzero(bad)[0]) + 1))
    arrivals = data[:, col["arrived_at"]] - data[0, col["arrived_at"]] if "arrived_at" in col else None
    prompts, decodes = data[:, col["num_prefill_tokens"]], data[:, col["num_decode_tokens"]]
    return Trace(prompts.astype(int), decodes.astype(int), arrivals)


def _loadtxt_error(e: Exception) -> str:
    """numpy's message, with its 0-based row of a value it cannot read made the 1-based data row that the
    other trace errors name."""
    text = str(e)
    if m := re.fullmatch(r"could not convert string (.*) to \w+ at row (\d+), column (\d+)\.", text):
        return f"row {int(m[2]) + 1}, column {m[3]}: {m[1]} is not a number"
    return text


def poisson_arrivals(n: int, rate: float, rng: np.random.Generator, cv: float = 1.0) -> np.ndarray:
    """Arrival times of a renewal process with mean rate ``rate``: Poisson for cv = 1, gamma
    inter-arrivals with coefficient of variation ``cv`` otherwise (cv > 1 is burstier)."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    if cv == 1.0:
        gaps = rng.exponential(1.0 / rate, n)
    else:
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), n)
    return np.cumsum(gaps) - gaps[0]


def piecewise_arrivals(schedule: Sequence[tuple[float, float]], rng: np.random.Generator,
                       cv: float = 1.0) -> np.ndarray:
    """Arrivals for consecutive phases of ``(duration_s, rate)``: e.g. load alternating 2 ↔ 5 QPS."""
    times, start = [], 0.0
    for duration, rate in schedule:
        expected = int(duration * rate * 1.5) + 10
        t = start + poisson_arrivals(expected, rate, rng, cv) + rng.exponential(1.0 / rate)
        times.append(t[t < start + duration])
        start += duration
    return np.concatenate(times)


@dataclass
class WorkloadSpec:
    trace: str = "azure_code"
    num_requests: int | None = None  # default: the whole trace (or what the arrivals give)
    rate: float | None = None  # requests/s; None replays the trace's own arrival times
    cv: float = 1.0  # burstiness of generated arrivals (1 = Poisson)
    schedule: Sequence[tuple[float, float]] = ()  # (duration, rate) phases instead of one rate
    class_mix: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_CLASS_MIX))
    importance_mix: Mapping[str, float] = field(default_factory=lambda: {"standard": 1.0})
    length_scale: float = 1.0  # multiply prompt and decode lengths (for small models)
    max_prompt_tokens: int | None = None  # clip longer prompts
    offset: int = 0  # first trace row used
    synthetic_lengths: tuple[int, int] | None = None  # (prompt, output) for every request, instead of a trace
    seed: int = 0


def requests_in(trace: str, duration: float, rate: float | None) -> int | None:
    """Requests arriving in ``duration`` seconds: rate × duration, or, replaying the trace's own arrival
    times (no rate), those of its first ``duration`` seconds; None for a trace without arrival times."""
    if rate:
        if rate * duration > MAX_REQUESTS:
            raise ValueError(f"{rate:g} req/s for {duration:g} s is more than {MAX_REQUESTS:,} requests, "
                             "the most one run takes")
        return max(1, int(rate * duration))
    arrivals = load_trace(trace).arrivals
    return None if arrivals is None else max(1, int(np.searchsorted(arrivals, duration)))


def _mix_draw(mix: Mapping[str, float], n: int, rng: np.random.Generator, what: str) -> np.ndarray:
    names = list(mix)
    weights = np.array([mix[k] for k in names], dtype=float)
    if len(names) == 0 or (weights < 0).any() or not (weights > 0).any() or not np.isfinite(weights).all():
        raise ValueError(f"{what} mix needs finite non-negative weights, not all zero")
    weights = weights / weights.max()  # weights near the float limit would overflow their sum
    return np.array(names, dtype=object)[rng.choice(len(names), size=n, p=weights / weights.sum())]


def build_workload(spec: WorkloadSpec) -> list[RequestSpec]:
    if spec.num_requests is not None and not 1 <= spec.num_requests <= MAX_REQUESTS:
        raise ValueError(f"a workload has 1 to {MAX_REQUESTS:,} requests, got {spec.num_requests:,}")
    rng = np.random.default_rng(spec.seed)
    if spec.synthetic_lengths:
        prompt, output = spec.synthetic_lengths
        trace = Trace(np.array([prompt]), np.array([output]), None)
    else:
        trace = load_trace(spec.trace)
    if spec.schedule:
        arrivals = piecewise_arrivals(spec.schedule, rng, spec.cv)
        n = len(arrivals) if spec.num_requests is None else min(spec.num_requests, len(arrivals))
        arrivals = arrivals[:n]
    elif spec.rate is not None:
        n = spec.num_requests or len(trace)
        arrivals = poisson_arrivals(n, spec.rate, rng, spec.cv)
    else:
        if trace.arrivals is None:
            raise ValueError(f"trace {spec.trace if not spec.synthetic_lengths else 'synthetic'} has no "
                             "arrival times: give a rate")
        n = min(spec.num_requests or len(trace), len(trace) - spec.offset)
        arrivals = trace.arrivals[spec.offset:spec.offset + n] - trace.arrivals[spec.offset]
    rows = (np.arange(n) + spec.offset) % len(trace)
    prompts, decodes = trace.prompt_tokens[rows] * spec.length_scale, trace.decode_tokens[rows] * spec.length_scale
    longest = max(prompts.max(initial=0), decodes.max(initial=0))
    if not longest <= MAX_TRACE_TOKENS:
        raise ValueError(f"length scale {spec.length_scale:g} makes a request of {longest:.3g} tokens "
                         f"(at most {MAX_TRACE_TOKENS:,})")
    prompts = np.maximum(np.rint(prompts), 1).astype(int)
    decodes = np.maximum(np.rint(decodes), 1).astype(int)
    if spec.max_prompt_tokens:
        prompts = np.minimum(prompts, spec.max_prompt_tokens)
    classes = _mix_draw(spec.class_mix, n, rng, "class")
    importances = _mix_draw(spec.importance_mix, n, rng, "importance")
    return [RequestSpec(float(a), int(p), int(d), str(c), Importance.parse(str(i)))
            for a, p, d, c, i in zip(arrivals, prompts, decodes, classes, importances, strict=True)]
