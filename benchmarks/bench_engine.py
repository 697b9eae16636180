"""Offline engine benchmark (issue 3): batch throughput and single-stream decode speed.

Workload as vLLM's ``benchmark_throughput`` with random prompts: N requests x (P prompt -> O output
tokens, EOS ignored) submitted at once; then one request alone, timing its decode steps.

    python benchmarks/bench_engine.py [--dtype auto|float32|bfloat16] [--num-requests 64] ...
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from offline_workload import random_prompts, report, throughput

from niyama.engine import EngineConfig, LLMEngine, SamplingParams
from niyama.engine.tuning import tune_process


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file or Hugging Face folder (default: SmolLM2-135M)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-native-kernels", dest="native_kernels", action="store_false",
                    help="every step in torch (default: native kernels where they apply)")
    ap.add_argument("--no-quantized", dest="quantized", action="store_false",
                    help="small batches read the bf16 weights (default: the codes of weights stored in 4 or 8 bits)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    config = EngineConfig(model=args.model, dtype=args.dtype, kv_cache_memory=1 << 30,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          max_num_seqs=max(args.num_requests, 1), num_threads=args.threads,
                          native_kernels=args.native_kernels, quantized=args.quantized)
    tune_process()  # as `niyama serve` runs
    engine = LLMEngine(config)
    vocab = engine.runner.config.vocab_size
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    engine.generate(random_prompts(4, 32, vocab, seed=1), SamplingParams(max_tokens=8, ignore_eos=True))

    prompts = random_prompts(args.num_requests, args.prompt_len, vocab)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    out = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(c.token_ids) for c in out)
    total = generated + sum(len(p) for p in prompts)

    single = engine.generate(random_prompts(1, args.prompt_len, vocab, seed=2), params)[0]
    decode_s = single.finish_time - single.first_token_time
    decode_rate = (len(single.token_ids) - 1) / decode_s

    results = {
        "model": str(args.model or "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)"),
        "dtype": str(engine.runner.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "native_kernels": engine.runner.model.kernels is not None,
        "quantized": engine.runner.model.quantized,
        "cpu": platform.processor() or platform.machine(),
        **throughput(args.num_requests, args.prompt_len, args.output_len, elapsed, generated, total, decode_rate,
                     single.first_token_time - single.arrival),
        # Other processes on the machine skew every figure: record the 1-minute load around the run.
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    report(results, args.json)


if __name__ == "__main__":
    main()
