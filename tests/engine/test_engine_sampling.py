"""Sampling parameters: seeds, top-k/top-p, stop strings and tokens, EOS, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from niyama.engine import SamplingParams
from niyama.engine.sampler import Sampler, _top_k_top_p


def test_top_k_top_p_masks():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.7)]
    kept = torch.isfinite(_top_k_top_p(logits, params))
    assert kept.tolist() == [[True, True, False, False], [True, True, False, False]]


def test_sampler_follows_the_distribution():
    sampler = Sampler()
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log().repeat(4000, 1)
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(4000)]
    tokens, _ = sampler(logits, [str(i) for i in range(4000)], params)
    counts = torch.bincount(torch.tensor(tokens), minlength=3) / 4000
    assert torch.allclose(counts, probs, atol=0.03)


def test_seeded_sampling_does_not_depend_on_the_batch(engine32, prompt_ids):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=7, ignore_eos=True)
    alone = engine32.generate([prompt_ids[3]], params)[0].token_ids
    batch = engine32.generate(prompt_ids[:4], [SamplingParams(max_tokens=12, temperature=1.0)] * 3 + [params])
    assert batch[3].token_ids == alone
    assert engine32.generate([prompt_ids[3]], params)[0].token_ids == alone


def test_top_k_one_is_greedy(engine32, prompt_ids):
    greedy = engine32.generate([prompt_ids[4]], SamplingParams(max_tokens=8, temperature=0.0))
    top1 = engine32.generate([prompt_ids[4]], SamplingParams(max_tokens=8, temperature=1.5, top_k=1))
    assert greedy[0].token_ids == top1[0].token_ids


def test_eos_stop_strings_and_stop_tokens(engine32, tokenizer, prompt_ids):
    chat = prompt_ids[0]
    reply = engine32.generate([chat], SamplingParams(max_tokens=64, temperature=0.0))[0]
    assert reply.finish_reason == "stop" and reply.token_ids[-1] in tokenizer.eos_token_ids
    forced = engine32.generate([chat], SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))[0]
    assert forced.finish_reason == "length" and len(forced.token_ids) == 64

    cut = engine32.generate([chat], SamplingParams(max_tokens=64, temperature=0.0, stop=("France",)))[0]
    assert cut.finish_reason == "stop" and "France" not in cut.text and reply.text.startswith(cut.text)
    second = reply.token_ids[1]
    by_token = engine32.generate([chat], SamplingParams(max_tokens=64, temperature=0.0,
                                                        stop_token_ids=(second,)))[0]
    assert by_token.token_ids == reply.token_ids[:2]


def test_logprobs(engine32, prompt_ids):
    out = engine32.generate([prompt_ids[5]], SamplingParams(max_tokens=6, temperature=0.0, logprobs=True))[0]
    assert out.logprobs is not None and len(out.logprobs) == 6
    assert all(lp <= 0 and math.isfinite(lp) for lp in out.logprobs)


def test_invalid_params():
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=1 << 64)


def test_extreme_values_sample_sensibly():
    """Values that round to 0 in float32, or exceed the vocabulary, act as their limits (no NaN)."""
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]])).repeat(3, 1)
    params = [SamplingParams(temperature=1e-50), SamplingParams(top_p=1e-50, seed=1),
              SamplingParams(top_k=1 << 62, temperature=1e-3, seed=2)]
    assert params[0].greedy
    tokens, _ = Sampler()(logits, ["a", "b", "c"], params)
    assert tokens == [1, 1, 1]


def test_prompt_ids_outside_the_vocabulary_are_refused(engine32, prompt_ids):
    with pytest.raises(ValueError, match="vocabulary"):
        engine32.generate([prompt_ids[1], [1, 1 << 40]], SamplingParams(max_tokens=2))
    assert not engine32.core.has_work()  # the valid prompt of the refused call is not left queued
    assert len(engine32.generate([prompt_ids[0]], SamplingParams(max_tokens=2))[0].token_ids) == 2
