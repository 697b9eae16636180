"""The iteration log (`niyama serve --iteration-log`) and fitting a predictor from it (`niyama profile --from-log`)."""

from __future__ import annotations

import argparse
import io
import json
import time

import pytest

from niyama.engine.commands import register
from niyama.engine.core import EngineCore
from niyama.engine.sampler import SamplingParams
from niyama.predictor import BatchTimePredictor
from niyama.request import Request
from niyama.scheduler import SchedulerConfig
from tests.conftest import CHAT, linear_predictor


def _serve(core: EngineCore, prompts: list[list[int]], max_tokens: int) -> None:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        core.add(Request(f"l{i}", time.monotonic(), CHAT, len(ids), max_tokens, ids), params)
    while core.has_work():
        core.step()


@pytest.mark.parametrize("scheduler", ["fcfs", "niyama"])
def test_every_iteration_is_logged_with_its_shape(runner32, tokenizer, prompt_ids, scheduler):
    log = io.StringIO()
    predictor = linear_predictor() if scheduler == "niyama" else None
    core = EngineCore(runner32, tokenizer, scheduler, SchedulerConfig(chunk_size=16), predictor, iteration_log=log)
    prompts = prompt_ids[:4]
    _serve(core, prompts, max_tokens=5)
    rows = [json.loads(line) for line in log.getvalue().splitlines()]
    assert sum(r["num_prefill_tokens"] for r in rows) == sum(len(p) for p in prompts)
    assert sum(r["num_decode_tokens"] for r in rows) == 4 * (5 - 1)
    assert all(r["seconds"] > 0 and r["waiting"] >= 0 for r in rows)
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)
    assert any(r["decode_ctx"] > 0 for r in rows) and any(r["prefill_ctx"] > 0 for r in rows)


def test_profile_fits_a_predictor_from_the_log(runner32, tokenizer, prompt_ids, tmp_path, capsys):
    log_path = tmp_path / "iterations.jsonl"
    with log_path.open("w") as log:
        core = EngineCore(runner32, tokenizer, "fcfs", SchedulerConfig(chunk_size=16), iteration_log=log)
        _serve(core, prompt_ids[:6], max_tokens=6)
    base = tmp_path / "base.json"
    BatchTimePredictor([[0.01, 1e-4, 0, 0, 0, 0]] * 3, splits=(6, 512),
                       meta={"model": "tiny", "kv_cache_tokens": 4096, "heldout_mape": 0.5}).save(base)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "served.json"
    args = parser.parse_args(["profile", "--from-log", str(log_path), "--base", str(base), "-o", str(out)])
    assert args.func(args) == 0
    assert "held-out MAPE" in capsys.readouterr().out
    served = BatchTimePredictor.load(out)
    rows = len(log_path.read_text().splitlines())
    assert served.meta["model"] == "tiny" and served.meta["kv_cache_tokens"] == 4096 and served.splits == (6, 512)
    assert served.meta["num_profile_batches"] == rows and served.meta["heldout_mape"] != 0.5
    assert served.meta["source"] == f"iteration log {log_path}"


def test_profile_rejects_a_file_that_is_not_an_iteration_log(tmp_path):
    bogus = tmp_path / "bogus.jsonl"
    bogus.write_text('{"hello": 1}\n')
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["profile", "--from-log", str(bogus), "-o", str(tmp_path / "p.json")])
    with pytest.raises(ValueError, match="not an iteration log"):
        args.func(args)
