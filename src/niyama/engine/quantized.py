"""The codes of weights that the model file stores quantized, for small batches on the CPU.

A decode step of a few sequences reads every weight once, so its time is the weights' bytes over memory
bandwidth: in bf16, SmolLM2-135M's 30 layers take ~17 ms a step on a 2-core Xeon whatever the kernel, and
its head ~4 ms more. The default GGUF stores the projections as Q4_1 (each group of 32 inputs of a row holds
16 evenly spaced values, ``low + step * q`` with ``q`` in 0..15) and the head as Q8_0 (``scale * q`` with
``q`` in -127..127). Read as such codes, the same weights are 5 and 8.5 bits each instead of 16: torch's
int4 kernel takes ~5 ms for the layers at one row, and a native kernel reads the head in ~1 ms.

Nothing is quantized that was not: a weight gets codes only if they rebuild it exactly (``exact_int4``,
``exact_q8``). The 8-bit head is exact in float32; the 4-bit layers round each group's step and offset to
bf16 (the kernel's format) where the bf16 path rounds every weight. Large batches keep the bf16 weights
(oneDNN/AMX): these kernels compute more per row and are slower there.
"""

from __future__ import annotations

import torch

GROUP = 32  # inputs per group, as in Q4_0/Q4_1/Q8_0


class Int4Weight:
    """A projection ``[out, in]`` as 4-bit codes plus a bf16 step and offset per group of ``GROUP`` inputs."""

    def __init__(self, codes: torch.Tensor, step: torch.Tensor, low: torch.Tensor):
        """``codes`` ``[out, in]`` int32 in 0..15; ``step``, ``low`` ``[out, in / GROUP]``: w = low + step * q."""
        self.packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        # The kernel computes (q - 8) * scale + zero.
        self.scales_zeros = torch.stack((step, low + 8 * step), dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP, self.scales_zeros)


def _groups(weight: torch.Tensor) -> torch.Tensor | None:
    out, inp = weight.shape
    return None if inp % GROUP else weight.float().reshape(out, inp // GROUP, GROUP)


def _rebuilds(codes: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, groups: torch.Tensor) -> bool:
    """Whether ``offset + step * codes`` is ``groups``: float32 arithmetic leaves ~1e-7 of a step; a weight
    that is not on the grid misses by up to half a step."""
    return bool(((offset + codes * step - groups).abs() <= 1e-3 * step).all())


def _nonzero(step: torch.Tensor) -> torch.Tensor:
    return torch.where(step > 0, step, torch.ones_like(step))


def exact_int4(weight: torch.Tensor) -> Int4Weight | None:
    """The 4-bit copy of a float32 ``[out, in]`` weight whose every group of ``GROUP`` inputs takes at most 16
    evenly spaced values from its minimum to its maximum (Q4_1's rule); None for any other weight."""
    groups = _groups(weight)
    if groups is None or weight.shape[0] % 16:  # the kernel packs rows in tiles of 16
        return None
    low = groups.amin(dim=-1, keepdim=True)
    step = _nonzero((groups.amax(dim=-1, keepdim=True) - low) / 15)
    codes = ((groups - low) / step).round_().clamp_(0, 15)
    if not _rebuilds(codes, step, low, groups):
        return None
    return Int4Weight(codes.reshape(weight.shape).to(torch.int32), step.squeeze(-1), low.squeeze(-1))


def exact_q8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """int8 codes ``[out, in]`` and float32 scales ``[out, in / GROUP]`` of a float32 weight whose every group
    of ``GROUP`` inputs is its scale times integers in -127..127, the largest magnitude 127 (Q8_0's rule);
    None for any other weight."""
    groups = _groups(weight)
    if groups is None:
        return None
    scale = _nonzero(groups.abs().amax(dim=-1, keepdim=True) / 127)
    codes = (groups / scale).round_().clamp_(-127, 127)
    if not _rebuilds(codes, scale, torch.zeros_like(scale), groups):
        return None
    return codes.reshape(weight.shape).to(torch.int8), scale.squeeze(-1).contiguous()
