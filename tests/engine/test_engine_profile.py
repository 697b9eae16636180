"""`niyama profile`: random mixed batches through the runner, a fitted predictor with its metadata."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from niyama.engine.commands import register
from niyama.engine.profiler import TINY_EVERY, fit, hardware_name, predictor_splits, profile
from niyama.predictor import BatchTimePredictor
from tests.engine.helpers import save_tiny


def test_profile_command_fits_and_saves(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    save_tiny(model_dir, "llama3")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "profile.json"
    args = parser.parse_args(["profile", "--model", str(model_dir), "--dtype", "float32", "--num-batches", "12",
                              "--max-tokens", "64", "--max-context", "128", "--repeats", "1",
                              "--kv-cache-memory", "0.01", "-o", str(out)])
    assert args.func(args) == 0
    assert "held-out MAPE" in capsys.readouterr().out
    predictor = BatchTimePredictor.load(out)
    meta = json.loads(out.read_text())["meta"]
    assert meta["dtype"] == "float32" and meta["kv_cache_tokens"] > 0 and meta["num_profile_batches"] == 12
    assert predictor.predict(32, 4, 400, 32) > 0
    assert meta["hardware"] == hardware_name(torch.device("cpu"))


def test_hardware_name_tells_cpu_kinds_apart():
    """A profile is cached by this name: the vector ISA and bf16 support are in it, as the same CPU model
    name has come with very different matmul speeds."""
    name = hardware_name(torch.device("cpu"))
    assert f"({torch.backends.cpu.get_cpu_capability()}" in name
    assert name.endswith(f"; {torch.get_num_threads()} threads)")
    flags = Path("/proc/cpuinfo").read_text()
    assert ("AVX512-BF16" in name) == (" avx512_bf16" in flags)


def test_profile_times_a_small_batch_path_and_bins_it(runner32):
    """A bf16 model on a CPU without native bf16 runs batches of up to 6 rows on other kernels: the profile
    then samples such batches and the predictor gets a bin for them."""
    runner32.model.small_batch_rows = 6  # what the bf16 model sets there
    try:
        result = profile(runner32, num_batches=24, max_tokens=64, max_context=128, repeats=2)
    finally:
        runner32.model.small_batch_rows = None
    assert result.splits == (6, 512) and len(result.times) == 24
    assert sum(s.num_tokens <= 6 for s in result.shapes) >= 24 // TINY_EVERY
    predictor, _ = fit(result, {})
    assert predictor.splits == (6, 512) and len(predictor.bins) == 3
    assert predictor_splits(runner32) == (512,)


def test_the_calibration_cache_tells_kv_block_sizes_apart(weights, runner32):
    """A server started with --block-size 32 must not reuse a calibration measured with 16-token blocks."""
    from niyama.engine import ModelRunner
    from niyama.server.calibration import cache_path

    config, state = weights
    blocks32 = ModelRunner(config, state, dtype=runner32.dtype, num_blocks=64, block_size=32)
    default, other = cache_path(runner32, "m", 512), cache_path(blocks32, "m", 512)
    assert runner32.block_size == 16 and "-kv16-" in default.name and "-kv32-" in other.name
    assert default.name.replace("-kv16-", "-kv32-") == other.name
