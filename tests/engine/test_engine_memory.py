"""The paged KV cache respects its memory budget, and a full cache preempts instead of failing."""

from __future__ import annotations

import pytest
import torch

from niyama.engine import EngineConfig, KVCache, LLMEngine, ModelRunner, SamplingParams, load_weights, num_kv_blocks
from niyama.qos import QoS
from niyama.request import Request
from tests.engine.helpers import make_runner, save_tiny


def test_kv_cache_fits_its_budget(weights):
    config, _ = weights
    for dtype in (torch.float32, torch.bfloat16):
        budget = 10_000_000
        blocks = num_kv_blocks(config, dtype, budget, block_size=16)
        cache = KVCache(config, blocks, 16, dtype)
        per_block = config.kv_bytes_per_token(dtype) * 16
        assert cache.nbytes <= budget < cache.nbytes + per_block
        assert cache.capacity_tokens == blocks * 16


def test_full_cache_preempts_and_recomputes(weights, tokenizer, engine32, prompt_ids):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = [p[:40] for p in prompt_ids]
    expected = [c.token_ids for c in engine32.generate(prompts, params)]
    # 8 requests need up to 8 * 64 tokens; the cache holds 12 blocks of 16 = 192 tokens.
    small = make_runner(weights, memory=12 * 16 * weights[0].kv_bytes_per_token(torch.float32))
    assert small.num_blocks == 12
    engine = LLMEngine(EngineConfig(), tokenizer=tokenizer, runner=small)
    out = engine.generate(prompts, params)
    assert engine.num_preemptions > 0
    assert [c.token_ids for c in out] == expected
    assert engine.kv.num_free_blocks == small.num_blocks  # every block returned


def test_request_larger_than_cache_is_rejected(weights, tokenizer):
    small = make_runner(weights, memory=4 * 16 * weights[0].kv_bytes_per_token(torch.float32))
    engine = LLMEngine(EngineConfig(), tokenizer=tokenizer, runner=small)
    with pytest.raises(ValueError, match="exceeds the context of 64 tokens"):
        engine.generate([[1] * 60], SamplingParams(max_tokens=10))


def test_request_beyond_the_model_context_is_rejected_and_the_engine_goes_on(tmp_path, tokenizer):
    """It used to fail mid-prefill with an IndexError and stay queued, failing every later call too."""
    save_tiny(tmp_path, "llama3")  # 256 positions, a KV cache for 2,048 tokens
    runner = ModelRunner(*load_weights(tmp_path), dtype=torch.float32, num_blocks=512, block_size=4)
    engine = LLMEngine(EngineConfig(), tokenizer=tokenizer, runner=runner)
    with pytest.raises(ValueError, match="exceeds the context of 256 tokens"):
        engine.generate([[1] * 250], SamplingParams(max_tokens=10))
    assert len(engine.generate([[1] * 5], SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids) == 3


def test_an_interrupted_generate_leaves_the_engine_usable(engine32):
    """An error (or Ctrl-C) inside the step loop used to leave that call's requests queued, holding KV blocks:
    every later call then failed on their outputs (KeyError)."""
    engine = engine32
    execute, steps = engine.runner.execute, []

    def failing(*args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return execute(*args, **kwargs)

    engine.runner.execute = failing
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.generate(["Hello there", "Tell me a story"], SamplingParams(max_tokens=8))
    finally:
        engine.runner.execute = execute
    assert not engine.core.has_work() and engine.kv.num_free_blocks == engine.kv.num_blocks
    assert len(engine.generate("Hi", SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids) == 4


def test_engine_settings_that_would_schedule_nothing_are_refused():
    for field in ("max_num_batched_tokens", "max_num_seqs", "block_size"):
        with pytest.raises(ValueError, match=field):
            EngineConfig(**{field: 0})


def test_an_empty_stop_string_is_ignored():
    assert SamplingParams(stop=("", "x")).stop == ("x",)


def test_the_core_refuses_what_would_fail_a_whole_batch(engine32):
    """Direct users of ``EngineCore`` (the server) get the context check too: a request past the context
    used to be taken and then fail every batch it ran in."""
    core, limit = engine32.core, engine32.core.max_model_len
    qos = QoS("t", ttlt=100.0)
    with pytest.raises(ValueError, match=f"exceeds the context of {limit} tokens"):
        core.add(Request("long", 0.0, qos, limit - 5, 10, [3] * (limit - 5)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="has no prompt token ids"):  # a simulator's request
        core.add(Request("lengths only", 0.0, qos, 5, 10), SamplingParams(max_tokens=10))
    assert not core.has_work()
