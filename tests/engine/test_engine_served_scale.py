"""Online calibration in the live engine: measured batch times rescale the scheduler's predictor."""

from __future__ import annotations

import time

from niyama.engine.core import EngineCore
from niyama.engine.sampler import SamplingParams
from niyama.engine.served_scale import ServedScale
from niyama.request import Request
from niyama.scheduler import SchedulerConfig
from tests.conftest import CHAT, linear_predictor


def test_engine_rescales_a_profile_that_is_far_too_fast(runner32, tokenizer, prompt_ids):
    # The profile claims a microsecond per batch; the real model takes milliseconds.
    profile = linear_predictor(1e-6, 1e-9)
    core = EngineCore(runner32, tokenizer, "niyama", SchedulerConfig(), profile)
    core.served_scale = ServedScale(profile, window=8, every=4)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(prompt_ids[:3]):
        core.add(Request(f"s{i}", time.monotonic(), CHAT, len(ids), params.max_tokens, ids), params)
    done = []
    while core.has_work():
        done += [out.request.request_id for out in core.step() if out.finished]
    assert sorted(done) == ["s0", "s1", "s2"]
    assert core.served_scale.scale > 100
    assert core.scheduler.predictor is not profile
    assert core.scheduler.predictor.meta["scale"] == core.served_scale.scale
    assert core.last_iteration is not None and core.last_iteration.batch_time_scale == core.served_scale.scale


def test_fcfs_has_no_predictor_to_rescale(runner32, tokenizer):
    core = EngineCore(runner32, tokenizer, "fcfs", SchedulerConfig())
    assert core.served_scale is None
