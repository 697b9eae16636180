"""Hugging Face directories and the Llama family's variants, against transformers on tiny random models:
Qwen2's q/k/v biases, Mistral, Llama 3 rope scaling, untied embeddings; and GGUF vs safetensors."""

from __future__ import annotations

import json

import pytest
import torch

from niyama.engine import ModelRunner, load_weights
from niyama.engine.kv_cache import num_kv_blocks
from niyama.memory import KVBlockManager
from tests.engine.helpers import TINY, make_request, save_tiny


def all_logits(runner: ModelRunner, tokens: list[int], chunk: int) -> torch.Tensor:
    """Logits at every position, computing the sequence in chunks of ``chunk`` tokens."""
    kv = KVBlockManager(runner.num_blocks, runner.block_size)
    r = make_request("x", tokens, 1)
    rows = []
    with torch.inference_mode():
        while r.num_computed_tokens < len(tokens):
            n = min(chunk, len(tokens) - r.num_computed_tokens)
            kv.allocate(r, n)
            batch = runner.prepare([(r, n)])
            hidden = runner.model.forward(batch.input_ids, batch.positions, batch.meta, runner.kv_cache)
            rows.append(runner.model.logits(hidden))
            r.num_computed_tokens += n
    return torch.cat(rows)


@pytest.mark.parametrize("kind", ["qwen2", "mistral", "llama3"])
def test_matches_transformers(tmp_path, kind):
    model = save_tiny(tmp_path, kind)
    config, state = load_weights(tmp_path)
    assert config.architecture == ("llama" if kind == "llama3" else kind)
    assert config.attention_bias == (kind == "qwen2")
    runner = ModelRunner(config, state, dtype=torch.float32,
                         num_blocks=num_kv_blocks(config, torch.float32, 1 << 20), block_size=4)
    tokens = torch.randint(0, TINY["vocab_size"], (150,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0]
    for chunk in (150, 9, 1):
        torch.testing.assert_close(all_logits(runner, tokens, chunk), expected, rtol=1e-4, atol=1e-4)


def test_hf_directory_matches_gguf(tmp_path, weights):
    """The default GGUF re-exported as config.json + safetensors loads to the same weights."""
    from safetensors.torch import save_file

    config, state = weights
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
    save_file(state, str(tmp_path / "model.safetensors"))
    config2, state2 = load_weights(tmp_path)
    assert config2 == config
    assert state2.keys() == state.keys() and all(torch.equal(state[k], state2[k]) for k in state)
