"""Float32 greedy generations match Hugging Face transformers token for token; bf16 stays close."""

from __future__ import annotations

import pytest
import torch

from niyama.engine import SamplingParams, default_model_path
from niyama.engine.model import RESCORED, Linear, rms_norm
from niyama.memory import KVBlockManager
from tests.engine.helpers import make_request, make_runner

NUM_TOKENS = 32


@pytest.fixture(scope="module")
def hf_model():
    """transformers' own GGUF reader and LlamaForCausalLM: an independent reference."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = str(default_model_path())
    model = LlamaForCausalLM(LlamaConfig(**load_gguf_checkpoint(path)["config"]))
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    model.tie_weights()
    return model.float().eval()


def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    out, past, ids = [], None, torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(num_tokens):
            result = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            ids = torch.tensor([[token]])
    return out


def test_fp32_greedy_matches_transformers(engine32, hf_model, prompt_ids):
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    ours = [c.token_ids for c in engine32.generate(prompt_ids, params)]
    for prompt, got in zip(prompt_ids, ours, strict=True):
        assert got == hf_greedy(hf_model, prompt, NUM_TOKENS)


def all_position_argmax(runner, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Top-1 prediction at every position of each sequence (teacher forcing, one prefill each)."""
    kv = KVBlockManager(runner.num_blocks, runner.block_size)
    result = []
    with torch.inference_mode():
        for i, seq in enumerate(sequences):
            r = make_request(f"s{i}", seq, 1)
            kv.allocate(r, len(seq))
            batch = runner.prepare([(r, len(seq))])
            hidden = runner.model.forward(batch.input_ids, batch.positions, batch.meta, runner.kv_cache)
            result.append(runner.model.logits(hidden).argmax(-1))
            kv.free(r)
    return result


def test_bf16_top1_agrees_with_fp32(weights, engine32, prompt_ids):
    """Teacher-forced over the fp32 greedy continuations: ~1000 positions."""
    params = SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True)
    sequences = [c.prompt_token_ids + c.token_ids for c in engine32.generate(prompt_ids, params)]
    reference = all_position_argmax(engine32.runner, sequences)
    bf16 = all_position_argmax(make_runner(weights, torch.bfloat16, 64 << 20), sequences)
    agree = sum(int((a == b).sum()) for a, b in zip(reference, bf16, strict=True))
    total = sum(a.numel() for a in reference)
    assert agree / total >= 0.99, f"bf16 top-1 agreement {agree / total:.4f}"


def test_bf16_logits_are_exact_at_the_top(weights, prompt_ids):
    """bf16 batches of at most Linear.SMALL_BATCH rows (any batch where bf16 is native) take bf16 logits and
    recompute their top candidates in float32: the candidates match the float32 head, and the tail stays
    within bf16 rounding. (Without the head's 8-bit codes, which give small batches exact logits.)"""
    runner = make_runner(weights, torch.bfloat16, 64 << 20, quantized=False)
    model = runner.model
    kv = KVBlockManager(runner.num_blocks, runner.block_size)
    r = make_request("p", prompt_ids[3], 1)
    kv.allocate(r, r.num_tokens)
    with torch.inference_mode():
        batch = runner.prepare([(r, r.num_tokens)])
        hidden = model.forward(batch.input_ids, batch.positions, batch.meta, runner.kv_cache)
        exact = torch.nn.functional.linear(rms_norm(hidden, model.norm, model.config.rms_norm_eps), model.lm_head)
        for rows in (1, Linear.SMALL_BATCH, 8):
            fast = model.logits(hidden[-rows:])
            if model.wide and rows > Linear.SMALL_BATCH:  # float32 head throughout
                torch.testing.assert_close(fast, exact[-rows:])
                continue
            top = exact[-rows:].topk(RESCORED // 2, dim=-1).indices
            torch.testing.assert_close(fast.gather(1, top), exact[-rows:].gather(1, top), rtol=0, atol=1e-4)
            assert torch.equal(fast.argmax(-1), exact[-rows:].argmax(-1))
            scale = exact[-rows:].abs().amax(-1, keepdim=True)
            assert ((fast - exact[-rows:]).abs() <= 0.01 * scale).all()
