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


@pytest.mark.parametrize(("kind", "overrides"), [
    ("qwen2", {}), ("mistral", {}), ("llama3", {}),
    ("llama3", {"attention_bias": True, "mlp_bias": True}),  # biases on every projection, o_proj's included
])
def test_matches_transformers(tmp_path, kind, overrides):
    model = save_tiny(tmp_path, kind, **overrides)
    config, state = load_weights(tmp_path)
    assert config.architecture == ("llama" if kind == "llama3" else kind)
    assert config.attention_bias == (kind == "qwen2" or "attention_bias" in overrides)
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


@pytest.mark.parametrize(("kind", "overrides", "context"), [
    ("mistral", {"sliding_window": 16}, 16),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 0}, 24),
    ("qwen2", {"use_sliding_window": False, "sliding_window": 24}, TINY["max_position_embeddings"]),
])
def test_a_sliding_window_limits_the_context_to_it(tmp_path, kind, overrides, context):
    """Windowed attention is not implemented: requests are limited to the window, where full attention
    computes the same (it used to attend past the window silently)."""
    model = save_tiny(tmp_path, kind, **overrides)
    config, state = load_weights(tmp_path)
    assert config.context_length == context
    runner = ModelRunner(config, state, dtype=torch.float32,
                         num_blocks=num_kv_blocks(config, torch.float32, 1 << 20), block_size=4)
    tokens = torch.randint(0, TINY["vocab_size"], (context,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(all_logits(runner, tokens, 5), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("change", "message"), [
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
    ({"num_key_value_heads": 3}, "4 attention heads cannot share 3 key/value heads"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
     "unsupported rope scaling 'dynamic'"),
])
def test_configs_it_cannot_run_are_refused(tmp_path, change, message):
    save_tiny(tmp_path, "llama3")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        ModelRunner(*load_weights(tmp_path), dtype=torch.float32, num_blocks=8, block_size=4)


def test_missing_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    save_tiny(tmp_path, "llama3")
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="no tensor 'lm_head.weight'"):
        ModelRunner(*load_weights(tmp_path), dtype=torch.float32, num_blocks=8, block_size=4)


def test_a_gguf_with_rope_scaling_it_cannot_apply_is_refused():
    from niyama.engine.weights import _gguf_config

    meta = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
            "llama.feed_forward_length": 96, "llama.block_count": 2, "llama.vocab_size": 96,
            "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}
    with pytest.raises(ValueError, match="unsupported GGUF rope scaling 'yarn'"):
        _gguf_config(meta, has_output=True)
    assert _gguf_config({**meta, "llama.rope.scaling.type": "linear"}, True).rope_scaling == {
        "rope_type": "linear", "factor": 4.0}
