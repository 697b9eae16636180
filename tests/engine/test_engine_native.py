"""The native CPU kernels (kernels.c) against the torch path they replace, and the fallback without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from niyama.engine import SamplingParams, native
from niyama.engine.attention import AttentionMetadata
from niyama.engine.model import TorchOps
from niyama.memory import KVBlockManager
from tests.engine.helpers import make_request, make_runner

kernels = native.load_native_kernels()


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance between bf16 tensors in units of the last place (for same-sign values)."""
    return (a.contiguous().view(torch.int16).int() - b.contiguous().view(torch.int16).int()).abs()


def test_the_kernels_build_on_this_machine():
    """CI's machines have a C compiler: the fast path must not silently fall back there."""
    assert kernels is not None


def test_loading_them_leaves_subnormal_floats_alone():
    """A library linked with -ffast-math would switch the whole process to flush-to-zero when it loads."""
    tiny = 5e-324  # the smallest subnormal double
    assert tiny * 1.0 > 0 and torch.tensor([1e-40]).mul(1.0).item() > 0


@pytest.mark.parametrize("block_size", [16, 5, 40])  # the kernel scores 16 tokens at a time
@pytest.mark.parametrize("dim", [64, 128, 48])  # 48: not a multiple of 32, the path without bf16 dot products
def test_decode_attention_matches_float32_attention_over_gathered_blocks(block_size, dim):
    torch.manual_seed(0)
    kv_heads, group, num_blocks = 3, 3, 1000
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim).bfloat16()
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim).bfloat16()
    lens = [1, 15, 16, 17, 100, 333, 2]  # within, at and past block edges
    width = -(-max(lens) // block_size)
    tables = torch.randperm(num_blocks)[:len(lens) * width].view(len(lens), width).to(torch.int32)
    q_rows = torch.randn(len(lens), kv_heads * group + 2 * kv_heads, dim).bfloat16()
    q = q_rows[:, :kv_heads * group]  # strided rows, as the model passes them (a view of qkv)
    out = torch.zeros(len(lens) + 1, kv_heads * group * dim, dtype=torch.bfloat16)

    kernels.decode_attention(q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), out[:len(lens)])

    for b, n in enumerate(lens):
        blocks = tables[b, :-(-n // block_size)].long()
        keys = k_cache[blocks].flatten(0, 1)[:n].float().transpose(0, 1)
        values = v_cache[blocks].flatten(0, 1)[:n].float().transpose(0, 1)
        query = q[b].float().view(kv_heads, group, dim)
        expected = F.scaled_dot_product_attention(query, keys, values).reshape(-1)
        torch.testing.assert_close(out[b].float(), expected, atol=1e-2, rtol=1e-2)
    assert not out[len(lens)].any()  # nothing written past the batch


@pytest.mark.parametrize("num_seqs", [1, 3])
def test_attention_is_the_same_while_threads_done_with_their_sequences_read_ahead(num_seqs):
    """Threads done with their sequences (or given none) read the given memory into the cache until all
    attention is done; the result does not change."""
    torch.manual_seed(5)
    k_cache, v_cache = torch.randn(2, 150, 16, 3, 64).bfloat16()
    tables = torch.randperm(150, dtype=torch.int32)[:num_seqs * 50].view(num_seqs, 50)
    lens = torch.tensor([790, 17, 400][:num_seqs], dtype=torch.int32)
    q = torch.randn(num_seqs, 9, 64).bfloat16()
    ahead = native.MemoryList((torch.randn(1 << 20), torch.zeros(3, dtype=torch.int8)))
    alone, read_ahead = torch.empty(2, num_seqs, 9 * 64, dtype=torch.bfloat16)
    kernels.decode_attention(q, k_cache, v_cache, tables, lens, alone)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(threads, 2))
        kernels.decode_attention(q, k_cache, v_cache, tables, lens, read_ahead, ahead)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, read_ahead)


def test_fused_elementwise_steps_compute_what_torch_computes():
    torch.manual_seed(1)
    ops, rows, hidden, eps = TorchOps(), 37, 576, 1e-5
    weight = torch.randn(hidden).bfloat16()
    h = torch.randn(rows, hidden) * 3
    assert torch.equal(kernels.rms_norm(h, weight, eps), ops.rms_norm(h, weight, eps))

    delta = torch.randn(rows, hidden).bfloat16()
    h_native, h_torch = h.clone(), h.clone()
    normed = kernels.add_rms_norm(h_native, delta, weight, eps)
    assert torch.equal(normed, ops.add_rms_norm(h_torch, delta, weight, eps))
    assert torch.equal(h_native, h_torch)

    gate_up = (torch.randn(rows, 2 * 1536) * 4).bfloat16()
    ulps = bf16_ulps(kernels.silu_mul(gate_up), ops.silu_mul(gate_up))  # exp() differs in its last bits
    assert ulps.max() <= 2 and (ulps > 0).float().mean() < 0.01


def test_rope_and_kv_store_match_torch():
    torch.manual_seed(2)
    heads, kv_heads, dim, rows = 9, 3, 64, 21
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim).bfloat16()
    cos, sin = torch.randn(512, dim).bfloat16(), torch.randn(512, dim).bfloat16()
    positions = torch.randint(0, 512, (rows,))
    slots = torch.randperm(50 * 16)[:rows]
    meta = AttentionMetadata(slots // 16, slots % 16, [], [])
    caches = [torch.zeros(50, 16, kv_heads, dim, dtype=torch.bfloat16) for _ in range(4)]

    native_qkv = kernels.rope_store_kv(qkv.clone(), heads, kv_heads, cos, sin, positions, meta, *caches[:2])
    torch_qkv = TorchOps.rope_store_kv(qkv.clone(), heads, kv_heads, cos, sin, positions, meta, *caches[2:])
    for a, b in zip(native_qkv, torch_qkv, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def teacher_forced_predictions(runner, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[int]]:
    """Greedy predictions of every continuation token, fed the given continuations: prompts prefilled in one
    batch, then decode steps for all sequences at once."""
    kv = KVBlockManager(runner.num_blocks, runner.block_size)
    requests = [make_request(f"s{i}", p, len(c) + 1)
                for i, (p, c) in enumerate(zip(prompts, continuations, strict=True))]
    for r in requests:
        kv.allocate(r, r.num_tokens)
    sampled = runner.execute([(r, r.num_tokens) for r in requests])
    predictions = [[sampled[r.request_id]] for r in requests]
    for step in range(len(continuations[0]) - 1):
        for r, c in zip(requests, continuations, strict=True):
            r.num_computed_tokens = r.num_tokens
            r.append_token(c[step], 0.0)
            kv.allocate(r, 1)
        sampled = runner.execute([(r, 1) for r in requests])
        for r, p in zip(requests, predictions, strict=True):
            p.append(sampled[r.request_id])
    return predictions


def test_rescored_logits_widen_the_row_and_recompute_its_top_k():
    torch.manual_seed(3)
    rows, vocab, dim, k = 5, 200, 48, 32
    low = torch.stack([torch.randperm(vocab) for _ in range(rows)]).bfloat16()  # distinct values, exact in bf16
    head, x = torch.randn(vocab, dim), torch.randn(rows, dim)
    top = low.float().topk(k, dim=-1).indices
    expected = low.float().scatter(1, top, torch.einsum("nkd,nd->nk", head[top], x))
    torch.testing.assert_close(kernels.rescored_logits(low, x, head, k), expected, rtol=1e-5, atol=1e-5)


def test_argmax_is_the_first_maximum_like_torch():
    torch.manual_seed(4)
    x = torch.randint(0, 5, (9, 1000)).float()  # many ties
    x[3] = 7.0  # a row that is all one value
    assert torch.equal(kernels.argmax(x), x.max(dim=-1).indices)
    assert torch.equal(kernels.argmax(x), x.argmax(dim=-1))


@pytest.mark.parametrize(("native_kernels", "quantized"), [(True, False), (False, False), (True, True)])
def test_bf16_decode_steps_agree_with_fp32(weights, engine32, prompt_ids, native_kernels, quantized):
    """Every bf16 path (native kernels, torch; the file's 4- and 8-bit codes for small batches) predicts the
    fp32 greedy token at >= 99% of decode positions."""
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    continuations = [c.token_ids for c in engine32.generate(prompt_ids, params)]
    runner = make_runner(weights, torch.bfloat16, 64 << 20, native_kernels, quantized)
    assert (runner.model.kernels is not None) == native_kernels
    assert runner.model.quantized == quantized  # the default GGUF: Q4_1 projections, a Q8_0 head
    # Quantized, decode steps of 4 sequences (at most Linear.CODES_BATCH rows) read the codes.
    group = 4 if quantized else len(prompt_ids)
    predictions = [p for i in range(0, len(prompt_ids), group)
                   for p in teacher_forced_predictions(runner, prompt_ids[i:i + group], continuations[i:i + group])]
    agree = sum(p == c for ps, cs in zip(predictions, continuations, strict=True) for p, c in zip(ps, cs, strict=True))
    total = sum(len(c) for c in continuations)
    assert agree / total >= 0.99, f"bf16 top-1 agreement {agree / total:.4f}"


def test_without_a_compiler_the_engine_keeps_the_torch_path(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("NIYAMA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    native.load_native_kernels.cache_clear()
    try:
        assert native.load_native_kernels() is None
        assert "native kernels unavailable" in caplog.text
    finally:
        native.load_native_kernels.cache_clear()
