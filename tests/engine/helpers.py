"""Helpers for the engine tests: runners over the default model and a direct greedy driver."""

from __future__ import annotations

import torch

from niyama.engine import ModelRunner
from niyama.engine.kv_cache import num_kv_blocks
from niyama.memory import KVBlockManager
from niyama.qos import QoS
from niyama.request import Request

QOS = QoS(name="test", ttlt=3600.0)

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def save_tiny(tmp_path, kind: str, **overrides):
    """A tiny random model of ``kind`` (config fields ``overrides``) saved as a Hugging Face folder; returns
    the transformers model."""
    import transformers

    torch.manual_seed(0)
    config_class, model_class = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }[kind]
    extra = {"rope_parameters": LLAMA3_ROPE} if kind == "llama3" else {}
    model = model_class(config_class(**{**TINY, **extra, **overrides})).float().eval()
    with torch.no_grad():  # random biases (transformers initialises them to zero)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    return model


def make_runner(weights, dtype: torch.dtype = torch.float32, memory: int = 256 << 20,
                native_kernels: bool = True, quantized: bool = True) -> ModelRunner:
    config, state = weights
    return ModelRunner(config, state, dtype=dtype, num_blocks=num_kv_blocks(config, dtype, memory),
                       native_kernels=native_kernels, quantized=quantized)


def make_request(request_id: str, prompt: list[int], max_tokens: int) -> Request:
    return Request(request_id, 0.0, QOS, len(prompt), max_tokens, list(prompt))

def drive(runner: ModelRunner, requests: list[Request], chunk: int | None = None) -> dict[str, list[int]]:
    """Greedy generation straight through the runner: every step, each unfinished request gets one
    decode or its next prefill chunk of at most ``chunk`` tokens (all remaining tokens if None)."""
    kv = KVBlockManager(runner.num_blocks, runner.block_size)
    active = list(requests)
    while active:
        chunks = []
        for r in active:
            n = r.num_uncomputed_tokens if chunk is None else min(chunk, r.num_uncomputed_tokens)
            kv.allocate(r, n)
            chunks.append((r, n))
        sampled = runner.execute(chunks)
        for r, n in chunks:
            r.num_computed_tokens += n
        for r in list(active):
            if r.request_id in sampled and r.append_token(sampled[r.request_id], 0.0):
                active.remove(r)
                kv.free(r)
    return {r.request_id: r.output_token_ids for r in requests}

