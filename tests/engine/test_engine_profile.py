"""`niyama profile`: random mixed batches through the runner, a fitted predictor with its metadata."""

from __future__ import annotations

import argparse
import json

from niyama.engine.commands import register
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
