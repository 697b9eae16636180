"""The codes of weights that the model file stores quantized, read as such by small batches on the CPU.

A decode step of a few sequences reads every weight once, so its time is the weights' bytes over memory
bandwidth: in bf16, SmolLM2-135M's 30 layers take ~17 ms a step on a 2-core Xeon whatever the kernel, and
its head ~4 ms more. The default GGUF stores the projections as Q4_1 (each group of 32 inputs of a row holds
16 evenly spaced values, ``low + step * q`` with ``q`` in 0..15) and the head as Q8_0 (``scale * q`` with
``q`` in -127..127), with fp16 scales. Read as codes, the same weights are 5 and 8.5 bits each instead of 16,
by native kernels: ``niyama_q4_linear`` (integer dot products with AVX512-VNNI, the inputs written as two
int8 per value, 16 outputs at a time) and ``niyama_q8_linear`` (exact float32 products). A model whose
projections are all 4-bit runs a small decode step through every layer in one native call
(``niyama.engine.model.FusedDecode``).

Nothing is quantized that was not: a weight gets codes only if they rebuild it exactly (``file_codes``).
The 8-bit path is exact; the 4-bit one rounds each input to ~1/64,000 of its group's largest magnitude
(far below the bf16 rounding it already carries) and keeps the file's steps and offsets exact. Large
batches keep the bf16 weights (oneDNN/AMX): these kernels compute per row and are slower there.
"""

from __future__ import annotations

import torch

from niyama.engine.native import Q4_MAX_GROUPS, NativeKernels, Q4Weight

GROUP = 32  # inputs per group, as in Q4_0/Q4_1/Q8_0
BLOCK = 16  # outputs the 4-bit kernel computes together


class Int4Codes:
    """A weight ``[out, in]`` as 4-bit codes and fp16 steps and offsets per group, read by the native kernel
    (bf16 in and out; integer products of the codes and the inputs' integer form, float32 sums:
    ``niyama_q4_linear``)."""

    bits = 4

    def __init__(self, codes: torch.Tensor, step: torch.Tensor, low: torch.Tensor):
        """``codes`` ``[out, in]`` in 0..15, ``step`` and ``low`` ``[out, in / GROUP]``: w = low + step * q."""
        out, inp = codes.shape
        blocks, groups = out // BLOCK, inp // GROUP
        # Per block of 16 outputs and group: 4 chunks of 16 outputs x 4 bytes; byte t of output i in chunk c
        # holds input 8c + t (low nibble) and 8c + 4 + t (high nibble) of the group (kernels.c).
        c = codes.to(torch.uint8).view(blocks, BLOCK, groups, 4, 2, 4)
        self.codes = (c[..., 0, :] | c[..., 1, :] << 4).permute(0, 2, 3, 1, 4).contiguous()
        self.step, self.low = (t.half().view(blocks, BLOCK, groups).transpose(1, 2).contiguous() for t in (step, low))
        self.weight = self.native(None)

    def native(self, bias: torch.Tensor | None) -> Q4Weight:
        """The weight as the kernels take it, with a bf16 ``bias`` or none (the tensors must outlive it)."""
        blocks, groups = self.step.shape[:2]
        return Q4Weight(self.codes.data_ptr(), self.step.data_ptr(), self.low.data_ptr(),
                        None if bias is None else bias.data_ptr(), blocks * BLOCK, groups * GROUP)

    def __call__(self, x: torch.Tensor, kernels: NativeKernels) -> torch.Tensor:
        return kernels.q4_linear(x, self.weight)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The memory a product reads."""
        return self.codes, self.step, self.low


class Int8Codes:
    """A weight ``[out, in]`` as int8 codes and fp16 scales per group, read by the native kernel: float32 out,
    exactly the products of the file's weights."""

    bits = 8

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor):
        self.codes = codes.to(torch.int8).contiguous()
        self.scale = scale.half().contiguous()

    def __call__(self, x: torch.Tensor, kernels: NativeKernels) -> torch.Tensor:
        return kernels.q8_linear(x, self.codes, self.scale)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The memory a product reads."""
        return self.codes, self.scale


def _on_grid(codes: torch.Tensor, step: torch.Tensor, low: torch.Tensor, groups: torch.Tensor) -> bool:
    """Whether ``low + step * codes`` rebuilds ``groups``: float32 arithmetic leaves ~1e-7 of a step, a
    weight off the grid misses by up to half a step."""
    return bool(((low + codes * step - groups).abs() <= 1e-3 * step).all())


def _fp16_step(step: torch.Tensor) -> torch.Tensor:
    """As the file has it (a step derived in float32 rounds back to the file's fp16 exactly); 1 for a constant
    group, whose codes are all 0."""
    return torch.where(step > 0, step, torch.ones_like(step)).half().float()


def file_codes(weight: torch.Tensor) -> Int4Codes | Int8Codes | None:
    """The codes of a float32 ``[out, in]`` weight whose every group of ``GROUP`` inputs lies on a Q4_1 grid
    (16 evenly spaced values from its minimum to its maximum, fp16 step and minimum) or else on a Q8_0 grid
    (its fp16 scale times integers in -127..127, the largest magnitude 127); None for any other weight, and
    for a 4-bit one the kernel does not take (outputs not a multiple of 16, more than 512 groups of inputs)."""
    out, inp = weight.shape
    if inp % GROUP:
        return None
    groups = weight.float().reshape(out, inp // GROUP, GROUP)
    low = groups.amin(dim=-1, keepdim=True).half().float()
    step = _fp16_step((groups.amax(dim=-1, keepdim=True) - low) / 15)
    codes = ((groups - low) / step).round_().clamp_(0, 15)
    if _on_grid(codes, step, low, groups):
        if out % BLOCK or inp // GROUP > Q4_MAX_GROUPS:
            return None
        return Int4Codes(codes.reshape(out, inp), step.squeeze(-1), low.squeeze(-1))
    scale = _fp16_step(groups.abs().amax(dim=-1, keepdim=True) / 127)
    codes = (groups / scale).round_().clamp_(-127, 127)
    if _on_grid(codes, scale, torch.zeros_like(scale), groups):
        return Int8Codes(codes.reshape(out, inp), scale.squeeze(-1))
    return None
