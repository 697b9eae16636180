"""The codes of weights the model file stores in 4 or 8 bits (niyama.engine.quantized), and where the model
reads them."""

from __future__ import annotations

import pytest
import torch

from niyama.engine.model import Linear, rms_norm
from niyama.engine.native import Q8_MAX_ROWS, load_native_kernels
from niyama.engine.quantized import GROUP, Int4Codes, Int8Codes, file_codes
from tests.engine.helpers import make_runner

kernels = load_native_kernels()


def q4_1_weight(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    """A float32 weight as a Q4_1 GGUF dequantizes: per group of 32 inputs, low + step * q with q in 0..15,
    both ends used, step and low fp16."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out, inp // GROUP, GROUP), generator=g)
    codes[..., 0], codes[..., 1] = 0, 15
    step = (torch.rand(out, inp // GROUP, 1, generator=g) * 0.01 + 1e-4).half().float()
    low = (-torch.rand(out, inp // GROUP, 1, generator=g) * 0.1).half().float()
    return (low + step * codes).reshape(out, inp)


def q8_0_weight(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    """A float32 weight as a Q8_0 GGUF dequantizes: per group of 32 inputs, scale * q, max |q| = 127."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (out, inp // GROUP, GROUP), generator=g)
    codes[..., 0] = 127
    scale = (torch.rand(out, inp // GROUP, 1, generator=g) * 0.01 + 1e-4).half().float()
    return (scale * codes).reshape(out, inp)


def test_a_q4_1_weight_gets_4_bit_codes():
    weight = q4_1_weight(48, 96)
    codes = file_codes(weight)
    assert isinstance(codes, Int4Codes)
    x = torch.randn(3, 96).bfloat16()
    expected = x.float() @ weight.t()
    # The kernel's only rounding beyond the bf16 input and output: each group's step and offset in bf16.
    torch.testing.assert_close(codes(x, kernels).float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_a_q8_0_weight_gets_8_bit_codes_with_exact_float32_products():
    weight = q8_0_weight(200, 96)
    codes = file_codes(weight)
    assert isinstance(codes, Int8Codes) and codes.codes.dtype == torch.int8
    assert torch.equal(codes.scale.float().unsqueeze(-1) * codes.codes.float().reshape(200, 3, GROUP),
                       weight.reshape(200, 3, GROUP))
    for rows in range(1, Q8_MAX_ROWS + 1):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(codes(x, kernels), x @ weight.t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at most"):
        codes(torch.randn(Q8_MAX_ROWS + 1, 96), kernels)


def test_weights_that_are_not_quantized_get_no_codes():
    assert file_codes(torch.randn(48, 96)) is None  # a float weight: quantizing it would lose precision
    for weight in (q4_1_weight(48, 96), q8_0_weight(48, 96)):
        weight[5, 7] *= 1.001  # one value off its group's grid
        assert file_codes(weight) is None
    assert file_codes(q4_1_weight(48, 96)[:, :80]) is None  # inputs not whole groups
    assert file_codes(q4_1_weight(40, 96)) is None  # torch's int4 kernel packs rows in tiles of 16
    assert isinstance(file_codes(q8_0_weight(40, 96)), Int8Codes)


def test_constant_groups_are_on_the_grid():
    weight = q4_1_weight(16, 64)
    weight[3, :32] = 0.25
    codes = file_codes(weight)
    assert isinstance(codes, Int4Codes)
    x = torch.randn(1, 64).bfloat16()
    torch.testing.assert_close(codes(x, kernels).float(), x.float() @ weight.t(), rtol=2e-2, atol=2e-2)
    assert isinstance(file_codes(torch.zeros(16, 64)), Int4Codes)


def test_small_batches_read_the_codes_and_large_ones_the_bf16_weight():
    weight = q4_1_weight(64, 128, seed=1)
    bias = torch.randn(64).bfloat16()
    linear = Linear(weight.bfloat16(), bias, Linear.PLAIN, file_codes(weight), kernels)
    small, large = torch.randn(Linear.SMALL_BATCH, 128).bfloat16(), torch.randn(Linear.SMALL_BATCH + 1, 128).bfloat16()
    assert torch.equal(linear(small), linear.codes(small, kernels) + bias)
    assert torch.equal(linear(large), torch.nn.functional.linear(large, weight.bfloat16(), bias))


def test_the_default_model_reads_its_codes_in_small_batches_only_where_asked(weights):
    on = make_runner(weights, torch.bfloat16, 16 << 20).model
    assert on.quantized and on.small_batch_rows == Linear.SMALL_BATCH
    # The default GGUF: Q4_1 projections, a Q8_0 head (tied with the embeddings).
    assert all(isinstance(x.codes, Int4Codes) for layer in on.layers for x in (layer.qkv, layer.o, layer.gate_up,
                                                                                layer.down))
    assert isinstance(on.head_codes, Int8Codes)
    off = make_runner(weights, torch.bfloat16, 16 << 20, quantized=False).model
    assert not off.quantized and off.head_codes is None and all(layer.qkv.codes is None for layer in off.layers)
    assert not make_runner(weights, torch.float32, 16 << 20).model.quantized  # float32 stays as it is
    assert not make_runner(weights, torch.bfloat16, 16 << 20, native_kernels=False).model.quantized


def test_small_batches_get_exact_logits_from_the_8_bit_head(weights):
    model = make_runner(weights, torch.bfloat16, 16 << 20).model
    hidden = torch.randn(Linear.SMALL_BATCH, weights[0].hidden_size)
    exact = torch.nn.functional.linear(rms_norm(hidden, model.norm, model.config.rms_norm_eps), model.lm_head)
    torch.testing.assert_close(model.logits(hidden), exact, rtol=1e-5, atol=1e-4)


def test_the_8_bit_kernel_without_avx512_or_f16c_gives_the_same_products(tmp_path, monkeypatch):
    """The portable C path (CPUs without AVX-512, and the fp16 conversion without F16C), built on purpose."""
    import ctypes

    from niyama.engine import native

    monkeypatch.setattr(native, "COMPILE_FLAGS", (*native.COMPILE_FLAGS, "-mno-avx512f", "-mno-f16c"))
    path = tmp_path / "portable.so"
    native.build(path)
    portable = native.NativeKernels(ctypes.CDLL(str(path)))
    weight = q8_0_weight(40, 96, seed=2)
    weight[0, :32] = 0.0  # an all-zero group
    codes = file_codes(weight)
    for rows in (1, 3, Q8_MAX_ROWS):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(codes(x, portable), x @ weight.t(), rtol=1e-5, atol=1e-5)
