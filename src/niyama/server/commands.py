"""``niyama serve``: the OpenAI-compatible server on the real engine."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any, TypeVar

from niyama.argtypes import at_least, non_empty, non_negative, output_file, port, positive_int
from niyama.engine.commands import add_engine_args, engine_config
from niyama.predictor import MIN_PROFILE_BATCHES
from niyama.scheduler import SCHEDULERS, SchedulerConfig
from niyama.scheduler_flags import add_niyama_switches, niyama_switches

NEEDS_PREDICTOR = ("niyama", "edf")
# Running requests at once. A cap that binds costs Niyama capacity (the simulator with this CPU's profile and
# live A/B points, docs/benchmarks.md): a slot stays taken until its request finishes, and with 64, at 18 req/s
# of the live evaluation's workload, requests that could still have made their deadline waited for slots.
DEFAULT_MAX_NUM_SEQS = 128
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512
T = TypeVar("T")


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                              description="Start the OpenAI-compatible server (chat and text completions "
                              "with per-request QoS) on the real engine.")
    add_engine_args(p)
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: file/folder name)")
    p.add_argument("--scheduler", default="niyama", choices=list(SCHEDULERS))
    p.add_argument("--qos-config", default=None,
                   help="TOML of QoS classes and [service_tiers] (default: the paper's A100 classes; for "
                   "the 2-core CPU default use configs/cpu-smollm2.toml, as `make serve` does)")
    p.add_argument("--max-num-seqs", type=positive_int, default=DEFAULT_MAX_NUM_SEQS,
                   help="most requests running at once")
    p.add_argument("--max-queued-requests", type=positive_int, default=1024,
                   help="waiting requests beyond which new ones get 429 (relegated ones do not count, up to "
                        "4x this number with them)")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS,
                   help="largest iteration, in tokens (Niyama's dynamic chunks stay within it)")
    p.add_argument("--chunk-size", type=positive_int, default=256,
                   help="fixed token budget of fcfs, srpf, priority and edf (and of niyama with --no-dynamic-chunking)")
    add_niyama_switches(p)
    p.add_argument("--host", type=non_empty, default="127.0.0.1")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--profile", default=None,
                   help="saved batch-time predictor (JSON); default: cached calibration for this machine "
                   "and model, run at start-up when missing")
    p.add_argument("--calibration-batches", type=at_least(MIN_PROFILE_BATCHES), default=24,
                   help=f"batches profiled when calibrating (at least {MIN_PROFILE_BATCHES})")
    p.add_argument("--no-online-calibration", dest="online_calibration", action="store_false",
                   help="keep the profile's batch times as they are (default: scale them by measured / "
                   "predicted time of recent iterations, exported as niyama:batch_time_scale)")
    p.add_argument("--shutdown-grace", type=non_negative, default=30.0, metavar="SECONDS",
                   help="on SIGINT/SIGTERM, how long open requests may run before they end with a 503 error "
                   "(a second signal ends them at once)")
    p.add_argument("--iteration-log", metavar="PATH", type=output_file, default=None,
                   help="append one JSON line per iteration (batch shape, execution time, queue lengths) to "
                   "PATH; `niyama profile --from-log PATH` fits a batch-time predictor from it")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from niyama.engine.core import EngineCore
    from niyama.engine.model_runner import ModelRunner
    from niyama.engine.tokenizer import Tokenizer
    from niyama.engine.tuning import tune_process
    from niyama.engine.weights import resolve_model_path
    from niyama.predictor import BatchTimePredictor
    from niyama.server.app import ServerState, create_app
    from niyama.server.async_engine import AsyncEngine, engine_thread
    from niyama.server.calibration import load_or_calibrate
    from niyama.server.http_server import DrainingServer
    from niyama.server.metrics import Metrics
    from niyama.server.qos_mapping import QoSPolicy

    policy = QoSPolicy.load(args.qos_config)
    # What can be refused is refused before the model loads and calibrates.
    predictor = BatchTimePredictor.load(args.profile) if args.profile else None
    path = resolve_model_path(args.model)
    config = engine_config(args)
    config.torch_device()  # an unknown device, or CUDA without a GPU
    listener = _bind(args.host, args.port)
    name = args.served_model_name or path.name.removesuffix(".gguf")
    tune_process()
    # All torch work (loading, calibrating, serving) on the engine loop's thread: see AsyncEngine.
    worker = engine_thread()
    print(f"niyama: loading {path}", file=sys.stderr)
    runner = _start_up(worker, ModelRunner.from_config, config)
    print(f"niyama: KV cache of {runner.num_blocks * runner.block_size} tokens in blocks of {runner.block_size} "
          f"on {runner.device}", file=sys.stderr)
    tokenizer = Tokenizer(args.model)
    if args.scheduler not in NEEDS_PREDICTOR:
        predictor = None
    elif predictor is None:
        predictor = _start_up(worker, load_or_calibrate, runner, name, args.max_num_batched_tokens,
                              args.calibration_batches)
    with open(args.iteration_log, "a", buffering=1) if args.iteration_log else nullcontext() as log:
        core = EngineCore(runner, tokenizer, args.scheduler, scheduler_config(args), predictor,
                          args.online_calibration, log)
        engine = AsyncEngine(core, Metrics(name), args.max_queued_requests, worker)
        state = ServerState(engine, tokenizer, policy, name, core.max_model_len, runner.config.vocab_size)
        print(f"niyama: serving {name} with the {args.scheduler} scheduler on http://{args.host}:{args.port}",
              file=sys.stderr)
        server = DrainingServer(uvicorn.Config(create_app(state), host=args.host, port=args.port,
                                               log_level="warning"), engine, args.shutdown_grace)
        server.run(sockets=[listener])
    return 0


def scheduler_config(args: argparse.Namespace) -> SchedulerConfig:
    """The scheduler settings ``niyama serve`` runs with (the switches act on ``--scheduler niyama`` only)."""
    return SchedulerConfig.within(args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                                  chunk_size=args.chunk_size, **niyama_switches(args))


def _start_up(engine_thread: ThreadPoolExecutor, step: Callable[..., T], *args: Any) -> T:
    """Run a start-up step (loading, calibrating) on the engine thread. Ctrl-C exits at once: torch work
    on another thread cannot be interrupted, and a normal exit would wait for the step to finish."""
    try:
        return engine_thread.submit(step, *args).result()
    except KeyboardInterrupt:
        print("\nniyama: interrupted", file=sys.stderr, flush=True)
        os._exit(130)


def _bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads and calibrates (a minute or more), so that a port
    in use or a bad host fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock

