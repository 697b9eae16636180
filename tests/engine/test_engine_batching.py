"""A request's output does not depend on its batch or on how its prompt is chunked."""

from __future__ import annotations

import pytest

from niyama.engine import EngineConfig, LLMEngine, SamplingParams
from niyama.engine.model_runner import decode_groups
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


def test_decode_groups_split_only_far_apart_lengths():
    assert decode_groups([]) == []
    assert decode_groups([500] * 4) == [(0, 4)]
    assert decode_groups([250, 200, 100, 1]) == [(0, 4)]  # short gaps: padding is cheaper than a group
    assert decode_groups([2000, 1000, 990, 10]) == [(0, 1), (1, 3), (3, 4)]


def test_decodes_far_apart_in_length_attend_in_groups(runner32, long_prompt, prompt_ids, alone):
    """A 700-token context decodes beside the ~50-token target: separate attention groups, same tokens."""
    longest = (prompt_ids[3] * 40)[:700]
    lengths = [len(longest), len(long_prompt), len(prompt_ids[1])]
    assert len(decode_groups(sorted(lengths, reverse=True))) > 1
    out = drive(runner32, [make_request("long", longest, NUM_TOKENS), make_request("a", long_prompt, NUM_TOKENS),
                           make_request("s", prompt_ids[1], NUM_TOKENS)])
    assert out["a"] == alone
    assert out["long"] == drive(runner32, [make_request("long", longest, NUM_TOKENS)])["long"]
