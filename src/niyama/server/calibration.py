"""The batch-time predictor for this machine and model: loaded from a file, from the cache, or calibrated.

Calibration profiles the real engine on a few random mixed batches (``niyama.engine.profiler``) and
fits the predictor; the result is cached under ``$NIYAMA_CACHE_DIR`` (default ``~/.cache/niyama``) keyed
by model, hardware, dtype, kernels (torch, or the native kernels' build; quantized copies or not, up to how
many rows), thread count, KV block size, batch-size limit and the fit's version, so it runs once per machine,
model and kernels' version.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from niyama.cache import cache_dir
from niyama.engine.model_runner import ModelRunner
from niyama.engine.native import library_path
from niyama.engine.profiler import fit, hardware_name, profile, runner_meta
from niyama.predictor import FIT_VERSION, BatchTimePredictor


def cache_path(runner: ModelRunner, model_name: str, max_tokens: int) -> Path:
    # The native kernels' build key (their source, flags and CPU): changed kernels are measured anew.
    kernels = library_path().stem if runner.model.kernels is not None else "torch"
    kernels += f"-quantized-s{runner.model.small_batch_rows}" if runner.model.quantized else ""
    key = (f"{model_name}-{hardware_name(runner.device)}-{runner.dtype}-{kernels}-t{torch.get_num_threads()}"
           f"-kv{runner.block_size}-b{max_tokens}-fit{FIT_VERSION}")
    return cache_dir() / "profiles" / (re.sub(r"[^A-Za-z0-9.]+", "-", key).strip("-") + ".json")


def load_or_calibrate(runner: ModelRunner, model_name: str, max_tokens: int, num_batches: int
                      ) -> BatchTimePredictor:
    """The cached predictor for this machine and model, else calibrate now and cache it."""
    path = cache_path(runner, model_name, max_tokens)
    if path.is_file():
        print(f"niyama: batch-time profile {path}", file=sys.stderr)
        return BatchTimePredictor.load(path)
    print(f"niyama: no batch-time profile for this machine and model; calibrating ({num_batches} batches)",
          file=sys.stderr)
    with tqdm(total=num_batches, desc="calibrating", unit="batch", file=sys.stderr) as bar:
        result = profile(runner, num_batches, max_tokens, max_context=2 * max_tokens, repeats=1,
                         progress=lambda done, _: bar.update(done - bar.n))
    predictor, mape = fit(result, runner_meta(runner, model_name))
    path.parent.mkdir(parents=True, exist_ok=True)
    predictor.save(path)
    print(f"niyama: calibrated (held-out error {mape:.1%}); cached in {path}", file=sys.stderr)
    return predictor
