"""Does a history of many batch shapes slow the engine? (With and without ``niyama.engine.tuning``.)

A server that has run through a burst of load has seen every batch size up to its token budget. This times
one fixed mixed batch (60 decodes, three fresh prompts, one prompt continued) on an engine thread, as the
server runs it, when the process is fresh, then again after ``--churn`` prefills of random sizes (1 to 512
tokens), in two fresh interpreters: one with the engine's process tuning (``niyama.engine.tuning``, and the
kernel-cache sizes ``niyama`` sets on import), one with glibc's and oneDNN's defaults.

    python benchmarks/bench_shape_churn.py [--churn 600] [--json results/bench_shape_churn.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from rich.console import Console
from rich.table import Table


def measure(tuned: bool, churn: int) -> dict[str, float]:
    """Median batch time (ms) fresh and after the churn, and page faults per timed batch after it."""
    if tuned:
        from niyama.engine.tuning import tune_process

        tune_process()
    else:  # oneDNN's and ideep's own default, which importing niyama would raise
        os.environ.update(ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024", LRU_CACHE_CAPACITY="1024")
    from niyama.engine import EngineConfig, ModelRunner
    from niyama.memory import KVBlockManager
    from niyama.qos import QoS
    from niyama.request import Request

    qos = QoS(name="bench", ttlt=3600.0)
    rng = random.Random(0)

    def request(rid: str, length: int) -> Request:
        return Request(rid, 0.0, qos, length, 64, [rng.randrange(100, 40000) for _ in range(length)])

    def setup():
        runner = ModelRunner.from_config(EngineConfig(kv_cache_memory=1 << 30))
        kv = KVBlockManager(runner.num_blocks, runner.block_size)
        decodes = []
        for i in range(60):
            r = request(f"d{i}", rng.randrange(60, 200))
            kv.allocate(r, r.num_tokens)
            runner.execute([(r, r.num_tokens)])
            r.num_computed_tokens = r.num_tokens
            r.append_token(5, 0.0)
            kv.allocate(r, 1)
            decodes.append(r)
        fresh = [request(f"p{i}", n) for i, n in enumerate((110, 40, 60))]
        for r in fresh:
            kv.allocate(r, r.num_tokens)
        cont = request("c", 120)
        kv.allocate(cont, 120)
        runner.execute([(cont, 58)])
        cont.num_computed_tokens = 58
        return runner, kv, [(r, 1) for r in decodes] + [(r, r.num_tokens) for r in fresh] + [(cont, 62)]

    def timed(n: int = 16) -> tuple[float, float]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times = []
        for _ in range(n):
            start = time.perf_counter()
            runner.execute(batch)
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n

    def prefills():
        for i in range(churn):
            r = request(f"x{i}", rng.randrange(1, 513))
            kv.allocate(r, r.num_tokens)
            runner.execute([(r, r.num_tokens)])
            kv.free(r)

    with ThreadPoolExecutor(1) as engine:  # the server's layout: torch work on one thread that is not main
        runner, kv, batch = engine.submit(setup).result()
        engine.submit(timed, 4).result()  # warm-up
        fresh_ms, _ = engine.submit(timed).result()
        engine.submit(prefills).result()
        after_ms, faults = engine.submit(timed).result()
    return {"fresh_ms": round(fresh_ms, 1), "after_ms": round(after_ms, 1), "slowdown": round(after_ms / fresh_ms, 3),
            "page_faults_per_batch_after": round(faults)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--churn", type=int, default=600, help="prefills of random sizes between the two timings")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--child", choices=("tuned", "defaults"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child == "tuned", args.churn)))
        return
    results = {}
    for setting in ("defaults", "tuned"):
        print(f"{setting}: timing, then {args.churn} prefills, then timing again ...", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, "--churn", str(args.churn), "--child", setting],
                             capture_output=True, text=True, check=True)
        results[setting] = json.loads(out.stdout.splitlines()[-1])
    table = Table(title=f"one mixed batch, fresh vs after {args.churn} prefills of random sizes")
    for column in ("process", "fresh (ms)", "after (ms)", "after / fresh", "page faults per batch after"):
        table.add_column(column, justify="right")
    for setting, r in results.items():
        table.add_row(setting, str(r["fresh_ms"]), str(r["after_ms"]), f"{r['slowdown']:.2f}",
                      str(r["page_faults_per_batch_after"]))
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": platform.processor() or platform.machine(), "churn": args.churn, **results}, f, indent=1)


if __name__ == "__main__":
    main()
