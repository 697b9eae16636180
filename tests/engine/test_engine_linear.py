"""Each weight layout of ``Linear`` computes what ``F.linear`` computes in the model dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from niyama.engine.config import native_bf16
from niyama.engine.model import Linear, linear_layout

LAYOUTS = [Linear.PLAIN, Linear.WIDE]
if native_bf16(torch.device("cpu")) and torch.backends.mkldnn.is_available():
    LAYOUTS.append(Linear.PACKED)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", [1, Linear.SMALL_BATCH + 1, 300])
def test_every_layout_matches_a_bf16_linear(layout, rows):
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64).bfloat16(), torch.randn(96).bfloat16()
    x = torch.randn(rows, 64)  # float32, as the residual stream arrives
    expected = F.linear(x.bfloat16().float(), weight.float(), bias.float())
    out = Linear(weight, bias, layout)(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 96)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)  # bf16 rounding of the result


def test_the_layout_follows_dtype_and_hardware():
    cpu = torch.device("cpu")
    assert linear_layout(torch.float32, cpu) == Linear.PLAIN
    expected = Linear.PACKED if Linear.PACKED in LAYOUTS else Linear.WIDE
    assert linear_layout(torch.bfloat16, cpu) == expected
