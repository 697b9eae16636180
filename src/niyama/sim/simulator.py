"""Discrete-event simulator: the real scheduler, a latency model instead of a GPU, virtual time.

Each step asks the scheduler for a batch at virtual time ``now``, advances ``now`` by the latency
model's time for that batch (a predictor profile, optionally with seeded multiplicative noise so that
the scheduler's own predictor is not exact), then reports the sampled tokens back. The "model" emits
its stop token when a request reaches its trace decode length, which the scheduler cannot see.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from niyama.memory import KVBlockManager
from niyama.predictor import BatchTimePredictor
from niyama.qos import QoSClasses
from niyama.request import Request
from niyama.scheduler import SchedulerConfig, make_scheduler
from niyama.sim.workload import RequestSpec

STOP_TOKEN = 1
STOP = frozenset({STOP_TOKEN})
MAX_TOKENS = 8192  # what a simulated client asks for; the trace length decides when it really stops


@dataclass
class SimConfig:
    scheduler: str = "niyama"
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    latency: BatchTimePredictor | None = None  # the "hardware"; default: the built-in A100 profile
    predictor: BatchTimePredictor | None = None  # what the scheduler believes; default: the latency model
    noise: float = 0.05  # std of the multiplicative noise on each batch time
    kv_cache_tokens: int | None = None  # default: the latency profile's meta, else 400k
    block_size: int = 16
    seed: int = 0


@dataclass
class SimResult:
    requests: list[Request]
    duration: float  # virtual seconds until the last request finished
    iterations: int
    num_preemptions: int


class _EOSAtTraceLength(dict):
    """The simulated model's output: the stop token once a request reaches its trace length."""

    def __init__(self, targets: dict[str, tuple[Request, int]]):
        super().__init__()
        self.targets = targets

    def __missing__(self, request_id: str) -> int:
        request, length = self.targets[request_id]
        return STOP_TOKEN if request.num_output_tokens + 1 >= length else 0


def simulate(specs: Sequence[RequestSpec], classes: QoSClasses, config: SimConfig | None = None,
             progress: bool = False) -> SimResult:
    config = config or SimConfig()
    latency = config.latency or BatchTimePredictor.load("a100-llama3-8b")
    predictor = config.predictor or latency
    kv_tokens = config.kv_cache_tokens or int(latency.meta.get("kv_cache_tokens", 400_000))
    kv = KVBlockManager(kv_tokens // config.block_size, config.block_size)
    scheduler = make_scheduler(config.scheduler, config.scheduler_config, kv, predictor)
    rng = random.Random(config.seed)

    specs = sorted(specs, key=lambda s: s.arrival)
    requests = []
    targets: dict[str, tuple[Request, int]] = {}
    for i, s in enumerate(specs):
        qos = classes[s.qos_class]
        if qos.importance is not s.importance:
            qos = qos.with_overrides({"importance": s.importance})
        if s.prompt_tokens >= kv.capacity_tokens:
            raise ValueError(f"a prompt of {s.prompt_tokens:,} tokens does not fit the simulated KV cache "
                             f"({kv.capacity_tokens:,} tokens)")
        max_tokens = min(MAX_TOKENS, kv.capacity_tokens - s.prompt_tokens)
        r = Request(str(i), s.arrival, qos, s.prompt_tokens, max_tokens, stop_token_ids=STOP)
        requests.append(r)
        targets[r.request_id] = (r, s.decode_tokens)
    tokens = _EOSAtTraceLength(targets)

    now, nxt, iterations = 0.0, 0, 0
    bar = tqdm(total=len(requests), desc=f"simulate {config.scheduler}", unit="req", disable=not progress,
               leave=False)
    while nxt < len(requests) or scheduler.has_work():
        while nxt < len(requests) and requests[nxt].arrival <= now:
            scheduler.add(requests[nxt])
            nxt += 1
        batch = scheduler.schedule(now) if scheduler.has_work() else None
        if not batch:
            if nxt >= len(requests):
                raise RuntimeError(f"scheduler {config.scheduler} stalled with work left")
            now = requests[nxt].arrival
            continue
        dt = latency.predict_shape(batch.shape())
        if config.noise:
            dt *= max(0.5, 1.0 + rng.gauss(0.0, config.noise))
        now += dt
        iterations += 1
        finished = scheduler.update(batch, now, tokens)
        bar.update(len(finished))
    bar.close()
    return SimResult(requests, now, iterations, scheduler.num_preemptions)
