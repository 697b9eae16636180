"""End to end with the default model, engine settings and dtype."""

from __future__ import annotations

from niyama.engine import EngineConfig, LLMEngine, SamplingParams


def test_capital_of_france_is_paris(tokenizer):
    engine = LLMEngine(EngineConfig(kv_cache_memory=64 << 20), tokenizer=tokenizer)
    reply = engine.chat([[{"role": "user", "content": "What is the capital of France?"}]],
                        SamplingParams(max_tokens=32, temperature=0.0))[0]
    assert "Paris" in reply.text
