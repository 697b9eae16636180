"""The CLI as a user runs it: a real subprocess, exit codes and one readable error line."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.server.conftest import _free_port


def niyama(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "niyama.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_simulate_writes_rows_summary_and_plot(tmp_path):
    out = tmp_path / "out"
    p = niyama("simulate", "--trace", "azure_conv", "--rate", "2", "--num-requests", "150",
               "--scheduler", "edf", "--output-dir", str(out))
    assert p.returncode == 0, p.stderr
    assert "interactive" in p.stdout and "overall" in p.stdout
    summary = json.loads((out / "sim-azure_conv-edf.json").read_text())
    assert summary["overall"]["requests"] == 150
    rows = (out / "sim-azure_conv-edf.csv").read_text().splitlines()
    assert len(rows) == 151 and rows[0].startswith("id,class,importance")
    assert (out / "sim-azure_conv-edf.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", "--trace", "nope", "--rate", "1"], "no trace 'nope'"),
        (["simulate", "--rate", "1", "--qos-config", "/nonexistent.toml"], "cannot read QoS config"),
        (["simulate", "--rate", "1", "--class-mix", "gold=1"], "unknown QoS class 'gold'"),
        (["simulate", "--rate", "1", "--profile", "tpu"], "cannot read profile tpu"),
        (["simulate", "--trace", "sharegpt"], "no arrival times"),
        (["simulate", "--rate", "1e6", "--duration", "1e5"], "is more than 10,000,000 requests"),
        (["experiment", "overload", "--trace", "nope"], "no trace 'nope'"),  # before a capacity search
        (["experiment", "capacity", "--trace", "sharegpt"], "always measures azure_code and azure_conv"),
        (["bench", "--cv", "3"], "--cv applies only with --rate"),
        (["bench", "--endpoint", "chat", "--rate", "1", "--vocab-size", "500"], "--vocab-size applies only with"),
        (["bench", "--trace", "synthetic", "--rate", "1", "--base-url", "http://127.0.0.1:99999/v1"],
         "not a valid base URL"),
    ],
)
def test_bad_input_is_one_line_and_nonzero_exit(tmp_path, args, message):
    p = niyama(*args, "--output-dir", str(tmp_path))
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("niyama: error:") and message in lines[0]


def test_an_output_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "afile").write_text("")
    p = niyama("simulate", "--rate", "1", "--output-dir", str(tmp_path / "afile"))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "afile is not a directory" in lines[0], p.stderr
    p = niyama("simulate", "--rate", "1", "--output-dir", str(tmp_path / "afile" / "sub"))
    message = f"niyama: error: cannot create the output directory {tmp_path}/afile/sub: Not a directory"
    assert p.stderr.strip() == message


def test_a_trace_value_that_is_not_a_number_names_its_row(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("num_prefill_tokens,num_decode_tokens\n10,2\n20,x\n")
    p = niyama("simulate", "--trace", str(trace), "--rate", "1", "--output-dir", str(tmp_path))
    assert p.stderr.strip() == f"niyama: error: trace {trace}: row 2, column 2: 'x' is not a number"


@pytest.mark.parametrize("command", [[], ["simulate"], ["capacity"], ["experiment"], ["profile"], ["generate"],
                                     ["serve"], ["bench"], ["bench", "capacity"]])
def test_every_help_page_prints(command, capsys):
    from niyama.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*command, "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: niyama")


def test_argument_errors_are_one_line(tmp_path):
    for args, message in [(["simulate", "--rate", "-3"], "niyama simulate: error: argument --rate: must be positive"),
                          (["capacity", "--schedulers", "fcfs,lifo"], "unknown scheduler(s) lifo"),
                          (["capacity", "--schedulers", ","], "--schedulers: no scheduler given"),
                          (["simulate", "--bogus"], "unrecognized arguments: --bogus"),
                          (["bench", "--label", "../x"], "must be a file name without folders"),
                          (["simulate", "--seed", "1e3"], "--seed: must be an integer >= 0, got '1e3'"),
                          (["simulate", "--class-mix", "interactive=1,interactive=2"], "interactive is given twice"),
                          (["bench", "capacity", "--threshold", "101"], "must be a percentage in (0, 100]"),
                          (["serve", "--host", ""], "--host: must not be empty"),
                          (["generate", "--top-p", "2", "hi"], "top_p must be in (0, 1]"),  # before the load
                          ([], "niyama: error: the following arguments are required: command")]:
        p = niyama(*args)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and message in lines[0], p.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", "--rate", "nan"], "argument --rate: must be a finite number"),
        (["capacity", "--start", "inf"], "argument --start: must be a finite number"),
        (["simulate", "--noise", "-1"], "argument --noise: must be >= 0"),
        (["simulate", "--chunk-size", "0"], "argument --chunk-size: must be a positive integer"),
        (["simulate", "--class-mix", "interactive=inf"], "bad weight"),
        (["experiment", "capacity", "--report", "/nonexistent-dir/r.md"], "no such directory: /nonexistent-dir"),
        (["profile", "-o", "/nonexistent-dir/p.json"], "no such directory: /nonexistent-dir"),
        (["serve", "--port", "70000"], "argument --port: must be a TCP port"),
        (["serve", "--max-num-batched-tokens", "0"], "must be a positive integer"),
        (["serve", "--calibration-batches", "3"], "argument --calibration-batches: must be an integer >= 8"),
        (["profile", "--num-batches", "2"], "argument --num-batches: must be an integer >= 8"),
        (["generate", "--threads", "100000", "hi"], "argument --threads: must be an integer from 1 to"),
        (["bench", "--cv", "inf"], "argument --cv: must be a finite number"),
        (["simulate", "--seed", "-1"], "argument --seed: must be an integer >= 0"),
        (["bench", "--priorities", "interactive=abc"], "argument --priorities: interactive=abc: not an integer"),
        (["bench", "--vocab-size", "100"], "argument --vocab-size: must be an integer >= 101"),
        (["serve", "--kv-cache-memory", "1e-12"], "argument --kv-cache-memory: must be at least one byte"),
        (["generate", "--kv-cache-memory", "0"], "argument --kv-cache-memory: must be positive"),
    ],
)
def test_values_no_run_can_use_are_refused_before_it_starts(args, message):
    p = niyama(*args)
    assert p.returncode == 2 and message in p.stderr.strip().splitlines()[-1]


def test_a_rate_too_low_for_the_duration_still_sends_one_request(tmp_path):
    p = niyama("simulate", "--rate", "1", "--duration", "0.001", "--output-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "sim-azure_code-niyama.json").read_text())["overall"]["requests"] == 1


def test_duration_without_a_rate_replays_that_window_of_the_trace(tmp_path):
    from niyama.sim.workload import load_trace

    p = niyama("simulate", "--duration", "30", "--output-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    expected = int((load_trace("azure_code").arrivals < 30).sum())
    assert json.loads((tmp_path / "sim-azure_code-niyama.json").read_text())["overall"]["requests"] == expected


def test_malformed_trace_and_profile_files_are_one_line(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("num_prefill_tokens,num_decode_tokens\n")
    nan = tmp_path / "nan.csv"  # a NaN arrival time once made the simulation loop forever
    nan.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,10\nnan,10,10\n")
    unsorted = tmp_path / "unsorted.csv"
    unsorted.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n5,10,10\n1,10,10\n")
    not_profile = tmp_path / "list.json"
    not_profile.write_text("[]")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe,a\n")
    infinite = tmp_path / "inf.json"
    infinite.write_text(json.dumps({"splits": [512], "bins": [[1, 0, 0, 0, 0, 0], [float("inf"), 0, 0, 0, 0, 0]]}))
    zero = tmp_path / "zero.json"
    zero.write_text(json.dumps({"splits": [512], "bins": [[1e-3, 0, 0, 0, 0, 0], [0, 0, -1e-5, 0, 0, 0]]}))
    short_rows = tmp_path / "short.csv"  # a header with more columns than the rows
    short_rows.write_text("num_prefill_tokens,num_decode_tokens,arrived_at\n100,20\n200,30\n")
    typo = tmp_path / "typo.toml"  # a misspelt top-level key once went unnoticed
    typo.write_text('scael = 10\n[classes.a]\nttft = 1\ntbt = 0.1\n')
    for args, message in [(["--trace", str(empty)], "has no rows"),
                          (["--trace", str(short_rows)], "its rows have 2 columns, its header 3"),
                          (["--qos-config", str(typo)], "unknown key(s) scael"),
                          (["--trace", str(nan)], "row 2 holds a value that is not a finite number"),
                          (["--trace", str(unsorted)], "arrived_at goes back in time at row 2"),
                          (["--trace", str(binary)], "is not UTF-8 text"),
                          (["--profile", str(not_profile)], "is not a batch-time profile"),
                          (["--profile", str(infinite)], "coefficients must be finite"),
                          (["--profile", str(zero)], "would price every batch at 0 s")]:
        p = niyama("simulate", "--rate", "1", "--duration", "5", "--output-dir", str(tmp_path), *args)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and message in lines[0]


@pytest.mark.parametrize(("args", "message"), [
    (["simulate", "--rate", "3", "--duration", "1e308"], "is more than 10,000,000 requests"),
    (["bench", "--trace", "synthetic", "--rate", "3", "--cv", "1e-200", "--base-url", "http://127.0.0.1:9/v1"],
     "out of range"),
])
def test_numbers_too_large_to_work_with_are_one_line(tmp_path, args, message):
    p = niyama(*args, "--output-dir", str(tmp_path))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and message in lines[0], p.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--service-tiers", "interactive=flex"], "--service-tiers applies only with --qos-mode service-tier"),
    (["--qos-mode", "niyama", "--priorities", "interactive=0"], "--priorities applies only with --qos-mode priority"),
    (["--trace", "azure_conv", "--input-len", "7"], "--input-len applies only with --trace synthetic"),
    (["--goodput", "ttfx:500"], "--goodput: unknown metric 'ttfx'"),
    (["--goodput", "ttft"], "argument --goodput: expected metric:milliseconds"),
])
def test_bench_refuses_options_it_would_ignore(tmp_path, args, message):
    p = niyama("bench", "--base-url", "http://127.0.0.1:9/v1", "--rate", "1", "--output-dir", str(tmp_path), *args)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and message in lines[0], p.stderr


def test_bench_goodput_thresholds_add_up_and_leave_the_capacity_word_alone():
    from niyama.cli import build_parser

    args = build_parser().parse_args(["bench", "--goodput", "ttft:500", "--goodput", "tpot:50", "e2el:9000"])
    assert args.goodput == [("ttft", 500.0), ("tpot", 50.0), ("e2el", 9000.0)]
    args = build_parser().parse_args(["bench", "capacity", "--goodput", "ttft:500", "--start", "2"])
    assert args.goodput == [("ttft", 500.0)] and args.start == 2.0


def test_bench_capacity_refuses_a_rate(tmp_path):
    p = niyama("bench", "--rate", "3", "capacity", "--base-url", "http://127.0.0.1:9/v1", "--output-dir", str(tmp_path))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "--rate does not apply to bench capacity" in lines[0], p.stderr


def test_iteration_log_from_a_bad_file_is_one_line(tmp_path):
    rows = {"num_prefill_tokens": 10, "num_decode_tokens": 2, "decode_ctx": 40, "prefill_ctx": 10, "seconds": 0.01}
    for line, message in [("[1, 2]", "line 4: not an iteration"),
                          (json.dumps({**rows, "num_prefill_tokens": "a"}), "line 4: batch sizes must be numbers"),
                          (json.dumps({**rows, "seconds": -1}), "line 4: batch sizes must be numbers"),
                          (json.dumps({**rows, "seconds": None}), "line 4: batch sizes must be numbers")]:
        log = tmp_path / "log.jsonl"
        log.write_text(f"{json.dumps(rows)}\n\n{json.dumps(rows)}\n{line}\n\n")  # blank lines are skipped
        p = niyama("profile", "--from-log", str(log), "-o", str(tmp_path / "p.json"))
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and message in lines[0], p.stderr
        assert not (tmp_path / "p.json").exists()
    # Six rows fit the six coefficients exactly and leave none to measure the error (it read 0.0%).
    log.write_text("".join(json.dumps({**rows, "seconds": 0.01 * (i + 1)}) + "\n" for i in range(6)))
    p = niyama("profile", "--from-log", str(log), "-o", str(tmp_path / "p.json"))
    assert p.returncode == 2 and "6 timed batches; a profile needs at least 8" in p.stderr, p.stderr


def test_serve_refuses_a_bad_profile_log_path_or_device_before_loading_the_model(tmp_path):
    for args, message in [(["--profile", str(tmp_path / "none.json")], "cannot read profile"),
                          (["--iteration-log", "/nonexistent-dir/log.jsonl"], "no such directory: /nonexistent-dir"),
                          (["--device", "tpu"], "unknown device 'tpu' (expected cpu, cuda or cuda:N)")]:
        p = niyama("serve", "--port", str(_free_port()), *args)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and message in lines[-1] and "loading" not in p.stderr, p.stderr


def test_serve_takes_the_engine_options_of_profile_and_generate():
    from niyama.cli import build_parser
    from niyama.engine.commands import engine_config

    args = build_parser().parse_args(["serve", "--device", "cpu", "--block-size", "32", "--kv-cache-memory", "0.5",
                                      "--threads", "1", "--no-quantized"])
    config = engine_config(args)
    assert (config.device, config.block_size, config.kv_cache_memory, config.num_threads, config.quantized) == \
        ("cpu", 32, 1 << 29, 1, False)


def test_serve_switches_niyamas_mechanisms_like_the_simulator():
    from niyama.cli import build_parser
    from niyama.scheduler import SchedulerConfig
    from niyama.server.commands import scheduler_config

    default = scheduler_config(build_parser().parse_args(["serve"]))
    assert (default.hybrid_alpha, default.dynamic_chunking, default.relegation) == \
        (SchedulerConfig.hybrid_alpha, True, True)
    switched = scheduler_config(build_parser().parse_args(
        ["serve", "--alpha", "0", "--no-dynamic-chunking", "--no-relegation", "--max-num-batched-tokens", "1024"]))
    assert (switched.hybrid_alpha, switched.dynamic_chunking, switched.relegation) == (0.0, False, False)
    assert switched.chunk_candidates[-1] == 1024  # the rest of serve's settings still apply
    p = niyama("serve", "--port", str(_free_port()), "--alpha", "-1")
    assert p.returncode == 2 and "--alpha" in p.stderr.strip().splitlines()[-1] and "loading" not in p.stderr


def test_serve_on_a_port_in_use_fails_before_loading_the_model():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        p = niyama("serve", "--port", str(taken.getsockname()[1]), "--scheduler", "fcfs")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Address already in use" in lines[0]


def _interrupt_once(args: list[str], shown: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``niyama ARGS``; once its stderr shows ``shown``, Ctrl-C it as a terminal does (SIGINT to the
    whole process group) and expect a prompt exit with status 130."""
    # A shell that starts the suite in the background (`make test &`) leaves SIGINT ignored for its children,
    # and Python then keeps ignoring it: give the command the default a terminal's foreground job has.
    p = subprocess.Popen([sys.executable, "-m", "niyama.cli", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    while shown not in seen:
        seen += p.stderr.read(1) or pytest.fail(f"the command ended early: {seen}")
    os.killpg(p.pid, signal.SIGINT)
    assert p.wait(timeout=60) == 130, p.stderr.read()
    assert p.stderr.read().strip().splitlines()[-1] == "niyama: interrupted"
    return p


def test_ctrl_c_stops_a_parallel_capacity_search_and_its_workers(tmp_path):
    """Worker processes used to carry on with every queued run after Ctrl-C (hours for a capacity search)."""
    p = _interrupt_once(["capacity", "--schedulers", "fcfs,edf,niyama", "--workers", "2", "--output-dir",
                         str(tmp_path)], "scheduler/s]")  # the progress bar: the workers are running
    for _ in range(100):  # the workers are gone too
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("worker processes outlived the interrupted command")


@pytest.mark.parametrize(("cached", "message"), [
    ({"azure_code": {"niyama": {"capacity": 0.0}}}, "capacity on azure_code is 0 req/s"),
    ({"azure_code": {"niyama": {}}}, "is not a result of `niyama experiment capacity`"),
    (["not", "a", "result"], "is not a result of `niyama experiment capacity`"),
])
def test_experiments_refuse_a_useless_cached_capacity(tmp_path, cached, message):
    (tmp_path / "sim-capacity.json").write_text(json.dumps(cached))
    p = niyama("experiment", "overload", "--output-dir", str(tmp_path))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and message in lines[0], p.stderr


def test_experiments_measure_again_a_capacity_cached_with_other_settings(tmp_path):
    """A capacity measured with other settings (here: another duration) used to be reused without a word."""
    cached = {"azure_code": {"niyama": {"capacity": 0.0}}, "settings": {"duration": 3600.0}}
    (tmp_path / "sim-capacity.json").write_text(json.dumps(cached))
    p = niyama("experiment", "overload", "--duration", "20", "--output-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "measured with other settings; measuring Niyama's capacity again" in p.stdout


def test_ctrl_c_stops_serve_while_it_calibrates(tmp_path):
    """Calibration runs on the engine thread, which Ctrl-C cannot interrupt; serve leaves without it. (SIGINT
    delivered to the busy engine thread used to be ignored until calibration ended.)"""
    env = {**os.environ, "NIYAMA_CACHE_DIR": str(tmp_path)}
    # Wait for the progress bar, not the line before it: a bar first drawn after the exit message was last.
    _interrupt_once(["serve", "--port", str(_free_port()), "--calibration-batches", "100000"], "batch/s]", env)


def test_engine_settings_it_cannot_use_are_one_line(tmp_path):
    from niyama.engine.weights import default_model_path

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "empty").mkdir()
    truncated = tmp_path / "cut.gguf"  # the default model's first bytes: its reader failed with an IndexError
    truncated.write_bytes(default_model_path().read_bytes()[:24])
    cases = [(["--device", "foo"], "unknown device 'foo'"),
             (["--kv-cache-memory", "100000"], "cannot allocate a 100000.0 GiB KV cache"),
             (["--model", str(tmp_path)], "config.json is not a usable model config"),
             (["--model", str(tmp_path / "empty")], "is neither a GGUF file nor a Hugging Face model folder"),
             (["--model", str(truncated)], f"{truncated}: not a usable model (IndexError")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA is not available"))
    for args, message in cases:
        p = niyama("generate", *args, "hi")
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and message in lines[-1] and lines[-1].startswith("niyama: error:"), p.stderr


def test_prompts_generate_cannot_use_are_refused_before_the_model_loads():
    for prompts, message in [(["hi", ""], "prompt 2 is empty"),
                             ([os.fsdecode(b"caf\xe9")], "prompt 1 is not valid UTF-8 text")]:  # Latin-1 bytes
        p = niyama("generate", "--", *prompts)
        assert p.returncode == 2 and p.stderr.strip() == f"niyama: error: {message}", p.stderr
