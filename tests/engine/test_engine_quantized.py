"""The codes of weights the model file stores in 4 or 8 bits (niyama.engine.quantized), and where the model
reads them."""

from __future__ import annotations

import pytest
import torch

from niyama.engine.model import Linear, rms_norm
from niyama.engine.native import Q8_MAX_ROWS, load_native_kernels
from niyama.engine.quantized import GROUP, exact_int4, exact_q8
from tests.engine.helpers import make_runner

kernels = load_native_kernels()


def q4_1_weight(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    """A float32 weight as a Q4_1 GGUF dequantizes: per group of 32 inputs, min + step * q with q in 0..15,
    both ends used."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out, inp // GROUP, GROUP), generator=g)
    codes[..., 0], codes[..., 1] = 0, 15
    step = torch.rand(out, inp // GROUP, 1, generator=g) * 0.01 + 1e-4
    low = -torch.rand(out, inp // GROUP, 1, generator=g) * 0.1
    return (low + step * codes).reshape(out, inp)


def test_a_q4_1_weight_gets_an_exact_copy():
    weight = q4_1_weight(48, 96)
    copy = exact_int4(weight)
    assert copy is not None
    x = torch.randn(3, 96).bfloat16()
    expected = x.float() @ weight.t()
    # The kernel's only rounding beyond the bf16 input: each group's step and offset stored in bf16.
    torch.testing.assert_close(copy(x).float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_weights_that_are_not_4_bit_get_no_copy():
    assert exact_int4(torch.randn(48, 96)) is None  # a float weight: quantizing it would lose precision
    weight = q4_1_weight(48, 96)
    weight[5, 7] += 1e-3  # one value off its group's grid
    assert exact_int4(weight) is None
    assert exact_int4(q4_1_weight(40, 96)) is None  # the kernel packs rows in tiles of 16
    assert exact_int4(q4_1_weight(48, 96)[:, :80]) is None  # inputs not whole groups


def test_a_constant_group_is_4_bit_too():
    weight = q4_1_weight(16, 64)
    weight[3, :32] = 0.25
    copy = exact_int4(weight)
    assert copy is not None
    x = torch.randn(1, 64).bfloat16()
    torch.testing.assert_close(copy(x).float(), x.float() @ weight.t(), rtol=2e-2, atol=2e-2)


def test_small_batches_read_the_copy_and_large_ones_the_bf16_weight():
    weight = q4_1_weight(64, 128, seed=1)
    bias = torch.randn(64).bfloat16()
    linear = Linear(weight.bfloat16(), bias, Linear.PLAIN, exact_int4(weight))
    small, large = torch.randn(Linear.SMALL_BATCH, 128).bfloat16(), torch.randn(Linear.SMALL_BATCH + 1, 128).bfloat16()
    assert torch.equal(linear(small), linear.int4(small) + bias)
    assert torch.equal(linear(large), torch.nn.functional.linear(large, weight.bfloat16(), bias))


def test_the_default_model_reads_4_bit_copies_in_small_batches_only_where_asked(weights):
    on = make_runner(weights, torch.bfloat16, 16 << 20).model
    assert on.quantized and on.small_batch_rows == Linear.SMALL_BATCH
    assert all(x.int4 is not None for layer in on.layers for x in (layer.qkv, layer.o, layer.gate_up, layer.down))
    off = make_runner(weights, torch.bfloat16, 16 << 20, quantized=False).model
    assert not off.quantized and off.head_q8 is None and all(layer.qkv.int4 is None for layer in off.layers)
    assert not make_runner(weights, torch.float32, 16 << 20).model.quantized  # float32 stays exact


def q8_0_weight(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    """A float32 weight as a Q8_0 GGUF dequantizes: per group of 32 inputs, scale * q, max |q| = 127."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (out, inp // GROUP, GROUP), generator=g)
    codes[..., 0] = 127
    scale = (torch.rand(out, inp // GROUP, 1, generator=g) * 0.01 + 1e-4).half().float()  # fp16 in the file
    return (scale * codes).reshape(out, inp)


def test_a_q8_0_weight_gives_exact_float32_products():
    weight = q8_0_weight(200, 96)
    codes, scales = exact_q8(weight)
    assert codes.dtype == torch.int8 and torch.equal(scales.unsqueeze(-1) * codes.float().reshape(200, 3, GROUP),
                                                     weight.reshape(200, 3, GROUP))
    for rows in range(1, Q8_MAX_ROWS + 1):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(kernels.q8_linear(x, codes, scales), x @ weight.t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at most"):
        kernels.q8_linear(torch.randn(Q8_MAX_ROWS + 1, 96), codes, scales)


def test_weights_that_are_not_8_bit_get_no_codes():
    assert exact_q8(torch.randn(48, 96)) is None
    weight = q8_0_weight(48, 96)
    weight[2, 40] *= 1.001
    assert exact_q8(weight) is None
    assert exact_q8(q8_0_weight(48, 96)[:, :80]) is None
    assert exact_q8(torch.zeros(16, 64)) is not None  # an all-zero group is 8-bit too


def test_the_default_model_takes_exact_logits_from_its_8_bit_head_in_small_batches(weights):
    model = make_runner(weights, torch.bfloat16, 16 << 20).model
    assert model.head_q8 is not None
    hidden = torch.randn(Linear.SMALL_BATCH, weights[0].hidden_size)
    exact = torch.nn.functional.linear(rms_norm(hidden, model.norm, model.config.rms_norm_eps), model.lm_head)
    torch.testing.assert_close(model.logits(hidden), exact, rtol=1e-5, atol=1e-4)
