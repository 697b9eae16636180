import itertools

import pytest

from niyama.memory import KVBlockManager
from niyama.predictor import BatchTimePredictor
from niyama.qos import Importance, QoS
from niyama.request import Request
from niyama.scheduler import SchedulerConfig, make_scheduler

CHAT = QoS("interactive", ttft=6.0, tbt=0.05)
BATCH = QoS("batch-10m", ttlt=600.0)
_ids = itertools.count()


def make_request(prompt=100, arrival=0.0, qos=CHAT, max_tokens=16, importance=None, priority=0, rid=None):
    if importance is not None:
        qos = qos.with_overrides({"importance": Importance.parse(importance)})
    return Request(rid or f"r{next(_ids)}", arrival, qos, prompt, max_tokens, priority=priority)


def linear_predictor(intercept=0.01, per_token=1e-4):
    """A known predictor: the same line in both bins, no context terms."""
    coef = [intercept, per_token, 0, 0, 0, 0]
    return BatchTimePredictor([coef, coef])


def build_scheduler(name="fcfs", num_blocks=10_000, block_size=16, predictor=None, **config):
    kv = KVBlockManager(num_blocks, block_size, watermark=0.0)
    return make_scheduler(name, SchedulerConfig(**config), kv, predictor or linear_predictor())


@pytest.fixture
def build():
    return build_scheduler


def run_to_completion(scheduler, requests, step=0.01, max_iters=100_000):
    """Drive a scheduler like the simulator does (token 0 each time) until all requests finish."""
    for r in requests:
        scheduler.add(r)
    now, finished = 0.0, []
    for _ in range(max_iters):
        if not scheduler.has_work():
            return finished
        batch = scheduler.schedule(now)
        now += step
        finished += scheduler.update(batch, now)
    raise AssertionError("did not finish")
