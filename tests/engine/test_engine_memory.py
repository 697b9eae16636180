"""The paged KV cache respects its memory budget, and a full cache preempts instead of failing."""

from __future__ import annotations

import pytest
import torch

from niyama.engine import EngineConfig, KVCache, LLMEngine, ModelRunner, SamplingParams, load_weights, num_kv_blocks
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
