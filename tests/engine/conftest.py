"""Shared fixtures: the default model's weights and tokenizer are loaded once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from niyama.engine import EngineConfig, LLMEngine, ModelRunner, Tokenizer, load_weights  # noqa: E402
from tests.engine.helpers import make_runner  # noqa: E402


@pytest.fixture(scope="session")
def weights():
    return load_weights(None)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="session")
def runner32(weights) -> ModelRunner:
    return make_runner(weights)


@pytest.fixture(scope="session")
def engine32(runner32, tokenizer) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype="float32"), tokenizer=tokenizer, runner=runner32)

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue, then list three colours of sunsets.",
]
TEXT_PROMPTS = [
    "def quicksort(items):\n    ",
    "The",
    "1, 2, 3, 5, 8, 13,",
    "Once upon a time, in a village at the edge of a great forest, there lived an old clockmaker who "
    "repaired every clock in the valley. One winter morning a stranger knocked at his door carrying "
    "a broken pocket watch that ran backwards.",
    "Translate to French: 'The weather is nice today, and we are going to the market to buy apples.'",
]


@pytest.fixture(scope="session")
def prompt_ids(tokenizer) -> list[list[int]]:
    """Eight varied prompts: chat and raw text, code, a number series, short and long."""
    chats = [tokenizer.chat([{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    return chats + [tokenizer.encode(p) for p in TEXT_PROMPTS]
