"""Interactive requests keep their TTFT while batch work is in flight with Niyama, and not with FCFS.

A comparison at the same load, not a timing test: the interactive TTFT target is set from a measured
iteration on this machine (4 iterations of ``MAX_BATCHED_TOKENS`` tokens), and the batch backlog ahead of
the interactive requests is 16 such iterations. FCFS serves prompts in arrival order, so its interactive
requests wait behind the whole backlog (≈ 13–16 iterations, far past the target); Niyama orders prompts
by deadline and serves them within about two iterations.
"""

from __future__ import annotations

import threading
import time

from tests.server.conftest import MAX_BATCHED_TOKENS, Server, serve

NUM_BATCH = 8
BATCH_PROMPT_TOKENS = 2 * MAX_BATCHED_TOKENS  # 8 × 2 = 16 iterations of prefill backlog
NUM_INTERACTIVE = 3


def _prompt(num_tokens: int) -> list[int]:
    return [(17 * i) % 5000 + 100 for i in range(num_tokens)]


def _iteration_time(server: Server) -> float:
    """TTFT of a lone prompt of one full iteration (measured by the server)."""
    r = server.client().completions.create(model=server.model, prompt=_prompt(MAX_BATCHED_TOKENS - 1),
                                           max_tokens=1, extra_body={"qos": "batch-10m"})
    return r.model_extra["niyama"]["ttft"]


def _run_mixed(server: Server, ttft: float, gap: float) -> list[dict]:
    """Submit the batch backlog, then interactive requests; their ``niyama`` objects (server-measured)."""
    client = server.client(timeout=1200)
    outcomes: list[dict] = []

    def batch(i: int) -> None:
        client.completions.create(model=server.model, prompt=_prompt(BATCH_PROMPT_TOKENS - i), max_tokens=4,
                                  extra_body={"qos": "batch-10m", "ignore_eos": True})

    def interactive() -> None:
        r = client.chat.completions.create(model=server.model, max_tokens=4,
                                           messages=[{"role": "user", "content": "What is 2 + 2?"}],
                                           extra_body={"qos": {"class": "interactive", "ttft": ttft, "tbt": 60}})
        outcomes.append(r.model_extra["niyama"])

    threads = [threading.Thread(target=batch, args=(i,)) for i in range(NUM_BATCH)]
    for t in threads:
        t.start()
    for _ in range(NUM_INTERACTIVE):
        time.sleep(gap)
        threads.append(threading.Thread(target=interactive))
        threads[-1].start()
    for t in threads:
        t.join()
    return outcomes


def test_interactive_ttft_under_batch_load(cache_dir):
    met, report = {}, []
    for scheduler in ("niyama", "fcfs"):
        with serve(cache_dir, "--scheduler", scheduler) as server:
            iteration = max(_iteration_time(server), _iteration_time(server))
            target = max(4 * iteration, 1.0)
            outcomes = _run_mixed(server, ttft=target, gap=iteration)
        met[scheduler] = sum(bool(o["slo_met"]) for o in outcomes)
        report.append(f"{scheduler}: iteration {iteration:.2f} s, TTFT target {target:.2f} s, interactive TTFTs "
                      f"{[round(o['ttft'], 2) for o in outcomes]}, met {met[scheduler]}/{NUM_INTERACTIVE}")
    print("\n".join(report))
    assert met["niyama"] == NUM_INTERACTIVE, report
    assert met["fcfs"] <= 1, report
