"""The codes of weights the model file stores in 4 or 8 bits (niyama.engine.quantized), and where the model
reads them."""

from __future__ import annotations

import pytest
import torch

from niyama.engine.model import Linear, rms_norm
from niyama.engine.native import Q4_MAX_GROUPS, Q4_MAX_ROWS, Q8_MAX_ROWS, load_native_kernels
from niyama.engine.quantized import GROUP, Int4Codes, Int8Codes, file_codes
from tests.engine.helpers import drive, make_request, make_runner

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
    assert codes.codes.dtype == torch.uint8 and codes.codes.numel() == 48 * 96 // 2  # two codes a byte


def assert_products(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """y is x . W^T up to its bf16 rounding (and the inputs' integer form, ~1/64,000 of a group's largest)."""
    expected = x.float() @ weight.t()
    torch.testing.assert_close(y.float(), expected, rtol=2 ** -8, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("rows", [1, 2, 5, Q4_MAX_ROWS])
def test_the_4_bit_kernel_gives_the_products_of_the_file_weights(rows):
    weight = q4_1_weight(48, 128, seed=rows)
    weight[1, :32] = 0.0  # an all-zero group
    x = torch.randn(rows, 128).bfloat16()
    x[0, 32:64] = 0.0  # and an all-zero group of inputs
    assert_products(file_codes(weight)(x, kernels), x, weight)


def test_the_4_bit_kernel_refuses_more_rows_than_it_takes():
    with pytest.raises(ValueError, match="unsupported shape"):
        file_codes(q4_1_weight(16, 64))(torch.randn(Q4_MAX_ROWS + 1, 64), kernels)


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
    assert file_codes(q4_1_weight(40, 96)) is None  # the 4-bit kernel computes 16 outputs at a time
    assert file_codes(q4_1_weight(16, 32 * (Q4_MAX_GROUPS + 1))) is None  # and takes at most 512 groups
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
    small, large = torch.randn(Linear.CODES_BATCH, 128).bfloat16(), torch.randn(Linear.CODES_BATCH + 1, 128).bfloat16()
    assert torch.equal(linear(small), linear.codes(small, kernels) + bias)
    assert torch.equal(linear(large), torch.nn.functional.linear(large, weight.bfloat16(), bias))


def test_the_default_model_reads_its_codes_in_small_batches_only_where_asked(weights):
    on = make_runner(weights, torch.bfloat16, 16 << 20).model
    assert on.quantized and on.small_batch_rows == Linear.CODES_BATCH
    # The default GGUF: Q4_1 projections, a Q8_0 head (tied with the embeddings).
    assert all(isinstance(x.codes, Int4Codes) for layer in on.layers for x in layer.projections)
    assert isinstance(on.head_codes, Int8Codes)
    off = make_runner(weights, torch.bfloat16, 16 << 20, quantized=False).model
    assert not off.quantized and off.head_codes is None and all(layer.qkv.codes is None for layer in off.layers)
    assert not make_runner(weights, torch.float32, 16 << 20).model.quantized  # float32 stays as it is
    assert not make_runner(weights, torch.bfloat16, 16 << 20, native_kernels=False).model.quantized


def test_small_batches_get_exact_logits_from_the_8_bit_head(weights):
    model = make_runner(weights, torch.bfloat16, 16 << 20).model
    hidden = torch.randn(Linear.CODES_BATCH, weights[0].hidden_size)
    exact = torch.nn.functional.linear(rms_norm(hidden, model.norm, model.config.rms_norm_eps), model.lm_head)
    torch.testing.assert_close(model.logits(hidden), exact, rtol=1e-5, atol=1e-4)


def build_kernels(directory, *flags: str):
    """The kernels built with extra compiler flags (to take another C path on this machine)."""
    import ctypes

    from niyama.engine import native

    path = directory / "kernels.so"
    compile_flags = native.COMPILE_FLAGS
    try:
        native.COMPILE_FLAGS = (*compile_flags, *flags)
        native.build(path)
    finally:
        native.COMPILE_FLAGS = compile_flags
    return native.NativeKernels(ctypes.CDLL(str(path)))


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """The portable C paths (CPUs without AVX-512, and the fp16 conversion without F16C)."""
    return build_kernels(tmp_path_factory.mktemp("portable"), "-mno-avx512f", "-mno-f16c")


def test_the_8_bit_kernel_without_avx512_or_f16c_gives_the_same_products(portable):
    weight = q8_0_weight(40, 96, seed=2)
    weight[0, :32] = 0.0  # an all-zero group
    codes = file_codes(weight)
    for rows in (1, 3, Q8_MAX_ROWS):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(codes(x, portable), x @ weight.t(), rtol=1e-5, atol=1e-5)


def test_the_4_bit_kernel_with_avx2_only_gives_the_same_products(tmp_path):
    """The AVX2 path (CPUs without AVX512-VNNI) computes the same integer sums, in the same float order."""
    avx2 = build_kernels(tmp_path, "-mno-avx512f")
    assert avx2.q4_vectorized
    weight = q4_1_weight(32, 192, seed=3)
    codes = file_codes(weight)
    for rows in (1, 3, Q4_MAX_ROWS):
        x = torch.randn(rows, 192).bfloat16()
        assert_products(codes(x, avx2), x, weight)
        assert torch.equal(codes(x, avx2), codes(x, kernels))


def test_without_a_vector_path_the_4_bit_weights_stay_bf16(portable, weights, monkeypatch):
    """A scalar 4-bit loop would be slower than the bf16 weights: such a build has none, and the model reads
    bf16 projections (the 8-bit head keeps its codes)."""
    from niyama.engine import model as model_module

    assert not portable.q4_vectorized
    with pytest.raises(ValueError, match="unsupported shape"):
        file_codes(q4_1_weight(16, 64))(torch.randn(1, 64), portable)
    monkeypatch.setattr(model_module, "load_native_kernels", lambda: portable)
    model = make_runner(weights, torch.bfloat16, 16 << 20).model
    assert model.kernels is portable and not model.fused_decode
    assert all(layer.qkv.codes is None for layer in model.layers) and isinstance(model.head_codes, Int8Codes)


def test_decode_steps_in_one_native_call_compute_what_the_per_op_path_computes(weights, prompt_ids, monkeypatch):
    """``FusedDecode`` runs the layers' ops of a small decode step in one call: the same numbers, bit for bit."""
    runner = make_runner(weights, torch.bfloat16, 64 << 20)
    model, kernels_used = runner.model, runner.model.kernels
    assert model.fused_decode  # the default GGUF: every projection Q4_1
    hidden: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    outputs, calls = {}, []
    logits, q4_decode = model.logits, kernels_used.q4_decode
    monkeypatch.setattr(kernels_used, "q4_decode", lambda *a: calls.append(1) or q4_decode(*a))
    for fused in (True, False):
        model.fused_decode = fused
        monkeypatch.setattr(model, "logits", lambda h, f=fused: hidden[f].append(h.clone()) or logits(h))
        requests = [make_request(f"r{i}", p, 12) for i, p in enumerate(prompt_ids[:Linear.CODES_BATCH])]
        outputs[fused] = drive(runner, requests)
        assert len(calls) == 11  # a call for each of the 11 decode steps with it, none more without it
    assert outputs[True] == outputs[False]
    assert all(torch.equal(a, b) for a, b in zip(hidden[True], hidden[False], strict=True))
