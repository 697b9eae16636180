"""A lower bound on how many requests of the live evaluation's workload any schedule must miss.

Relaxation: one machine that runs each token at the profile's cheapest price (a prefill token, or a decode
token plus its context term, with the iteration's fixed cost spread over a full iteration), preemptible
between tokens, with no cap on running requests and no batching effects. A kept request must have its work
due by ``d`` (all of it for batch work; the prompt and the tokens due by then for interactive work, whose
n-th token is due at arrival + TTFT + (n - 1) × TBT) done by ``d``, and not before it arrives. So for every
window [a, d], the work due by d of requests arriving at or after a must fit in d - a; dropping the largest
first is the fewest drops that make one window fit, and the most over all windows bounds any schedule.
Beside the bound, a schedule on the same machine that knows every request's length (clairvoyant): preemptive
EDF, and at each arrival the largest requests ahead of any that would end late are dropped until none does
(Moore-Hodgson), an interactive request due whole at its first token's deadline plus its own decode work
(stricter than its pace). The relaxed optimum lies between the two numbers.
With ``--run``, a bench run's per-request JSONL: the share of the work its missed requests held, priced the
same way, and how many requests the same work costs when the largest go first.

    .venv/bin/python benchmarks/window_bound.py --rate 44.77 --profile results/live/profile-calibration.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from eval_live import LENGTH_SCALE, MAX_BATCHED_TOKENS, QOS_CONFIG, SEED, TRACE

from niyama.bench.commands import requests_in
from niyama.predictor import BatchTimePredictor
from niyama.qos import QoSClasses
from niyama.sim.workload import WorkloadSpec, build_workload


def token_prices(profile: BatchTimePredictor, scale: float) -> tuple[float, float, float]:
    """Seconds per prefill token, per decode token, and per decode token per token of its context: the
    cheapest over the predictor's bins that serve iterations of at most ``MAX_BATCHED_TOKENS``, each bin's
    fixed cost spread over the most tokens it serves (coefficients: intercept, tokens, prefill, decode,
    decode_ctx, prefill_ctx; the context terms of prefill are left out, which only lowers the bound)."""
    prices = []
    for lower, upper, c in zip((0, *profile.splits), (*profile.splits, MAX_BATCHED_TOKENS), profile.bins,
                               strict=False):
        if lower < MAX_BATCHED_TOKENS:
            fixed = c[0] / min(upper, MAX_BATCHED_TOKENS)
            prices.append((c[1] + c[2] + fixed, c[1] + c[3] + fixed, c[4]))
    return tuple(scale * min(p[i] for p in prices) for i in range(3))  # type: ignore[return-value]


def clairvoyant_misses(arrival: np.ndarray, work: np.ndarray, due: np.ndarray) -> int:
    """Requests a clairvoyant one-machine schedule drops: requests (sorted by arrival) with ``work`` seconds
    each, due whole by ``due``; preemptive EDF, each arrival followed by Moore-Hodgson drops (see above)."""
    pending_due, pending_work = np.zeros(0), np.zeros(0)  # in deadline order
    now, drops = 0.0, 0
    for a, w, d in zip(arrival, work, due, strict=True):
        done = np.searchsorted(np.cumsum(pending_work), a - now, side="right")  # served in full by a
        if done < len(pending_work):
            pending_work[done] -= a - now - pending_work[:done].sum()
        pending_due, pending_work, now = pending_due[done:], pending_work[done:], a
        i = np.searchsorted(pending_due, d, side="right")
        pending_due, pending_work = np.insert(pending_due, i, d), np.insert(pending_work, i, w)
        while (late := np.flatnonzero(now + np.cumsum(pending_work) > pending_due)).size:
            victim = np.argmax(pending_work[:late[0] + 1])
            pending_due, pending_work = np.delete(pending_due, victim), np.delete(pending_work, victim)
            drops += 1
    return drops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, required=True, help="req/s of arrivals")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals")
    p.add_argument("--profile", required=True, help="batch-time profile (JSON) giving the token prices")
    p.add_argument("--price-factor", type=float, default=1.0, help="multiply every price (>1: no longer a bound)")
    p.add_argument("--step", type=float, default=1.0, help="grid of window ends and starts, in seconds")
    p.add_argument("--run", default=None, help="a bench run's per-request JSONL to compare (see above)")
    args = p.parse_args()

    classes = QoSClasses.load(QOS_CONFIG)
    count = requests_in(TRACE, args.duration, args.rate)
    specs = build_workload(WorkloadSpec(trace=TRACE, rate=args.rate, num_requests=count,
                                        class_mix={c: 1.0 for c in classes}, length_scale=LENGTH_SCALE, seed=SEED))
    prefill_price, decode_price, context_price = token_prices(BatchTimePredictor.load(args.profile), args.price_factor)
    n = len(specs)
    arrival = np.array([s.arrival for s in specs])
    qos = [classes[s.qos_class] for s in specs]
    interactive = np.array([q.interactive for q in qos])
    due = arrival + np.array([q.ttft if q.interactive else q.ttlt for q in qos])  # first token, or the last
    pace = np.array([q.tbt if q.interactive else 1.0 for q in qos])
    prompt = np.array([s.prompt_tokens for s in specs])
    steps = np.array([max(s.decode_tokens - 1, 0) for s in specs])  # the first token comes with the prefill
    # done[j, k]: request j's work once its prompt and the k decode steps after its first token are done
    done = np.zeros((n, steps.max() + 1))
    for j in range(n):
        step_work = decode_price + context_price * (prompt[j] + np.arange(1, steps[j] + 1))
        done[j, 1:steps[j] + 1] = np.cumsum(step_work)
        done[j, steps[j] + 1:] = done[j, steps[j]]
    done += (prompt * prefill_price)[:, None]
    rows = np.arange(n)

    best, where = 0, None
    for d in np.arange(args.step, arrival.max() + max(due - arrival) + 2 * args.step, args.step):
        owed = due <= d
        k = np.where(interactive, np.floor((d - due) / pace), steps).clip(0, steps).astype(int)
        demand = np.where(owed, done[rows, k], 0.0)
        for a in np.arange(0.0, min(d, arrival.max() + args.step), args.step):
            work = np.sort(demand[(arrival >= a) & owed])[::-1]
            excess = work.sum() - (d - a)
            if excess > 0:
                drops = int(np.searchsorted(np.cumsum(work), excess, side="right")) + 1
                if drops > best:
                    best, where = drops, (a, d)
    print(f"{n} requests at {args.rate} req/s; prices: prefill {prefill_price * 1e3:.3f} ms/token, decode "
          f"{decode_price * 1e3:.3f} ms + {context_price * 1e6:.2f} µs per context token")
    window = f" (window {where[0]:.0f}–{where[1]:.0f} s)" if where else ""
    print(f"at least {best} requests ({best / n:.1%}) must miss{window}")
    total = done[rows, steps]
    decode_work = total - prompt * prefill_price
    order = np.argsort(arrival, kind="stable")
    dropped = clairvoyant_misses(arrival[order], total[order], np.where(interactive, due + decode_work, due)[order])
    print(f"a clairvoyant schedule misses {dropped} requests ({dropped / n:.1%})")
    if args.run:
        rows = [json.loads(line) for line in Path(args.run).read_text().splitlines()]
        prompt = np.array([r["prompt_tokens"] for r in rows])
        steps = np.array([max(r["output_tokens"] - 1, 0) for r in rows])
        work = prompt * prefill_price + steps * (decode_price + context_price * (prompt + (steps + 1) / 2))
        missed = np.array([r["slo_met"] is not True for r in rows])
        shed = work[missed].sum()
        largest_first = int(np.searchsorted(np.cumsum(np.sort(work)[::-1]), shed)) + 1
        print(f"{args.run}: missed {missed.mean():.1%} of requests, holding {shed / work.sum():.1%} of the work; "
              f"the largest requests first, that work is {largest_first / len(rows):.1%} of requests")


if __name__ == "__main__":
    main()
