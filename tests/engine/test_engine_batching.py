"""A request's output does not depend on its batch or on how its prompt is chunked."""

from __future__ import annotations

import pytest

from niyama.engine import EngineConfig, LLMEngine, SamplingParams
from tests.engine.helpers import drive, make_request

NUM_TOKENS = 16


@pytest.fixture(scope="module")
def long_prompt(prompt_ids) -> list[int]:
    return prompt_ids[6]  # the story, ~50 tokens: spans several KV blocks


@pytest.fixture(scope="module")
def alone(runner32, long_prompt) -> list[int]:
    return drive(runner32, [make_request("a", long_prompt, NUM_TOKENS)])["a"]


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_matches_whole_prefill(runner32, long_prompt, alone, chunk):
    assert drive(runner32, [make_request("a", long_prompt, NUM_TOKENS)], chunk)["a"] == alone


def test_batched_with_fifteen_others(runner32, tokenizer, long_prompt, alone, prompt_ids):
    """16 requests under a small token budget: the target is prefilled in chunks next to other
    requests' decodes and prefills, and decodes beside prompts of every length."""
    engine = LLMEngine(EngineConfig(max_num_batched_tokens=24), tokenizer=tokenizer, runner=runner32)
    others = [prompt_ids[i % 8][: 5 + 3 * i] for i in range(15)]
    prompts = others[:7] + [long_prompt] + others[7:]
    out = engine.generate(prompts, SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True))
    assert out[7].token_ids == alone


def test_mixed_chunk_sizes_in_one_batch(runner32, long_prompt, prompt_ids, alone):
    """Several requests stepping together, each with its own fixed chunk size."""
    requests = [make_request("a", long_prompt, NUM_TOKENS)] + [
        make_request(f"o{i}", prompt_ids[i], NUM_TOKENS) for i in range(3)]
    assert drive(runner32, requests, chunk=5)["a"] == alone
