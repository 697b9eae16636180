"""The CLI as a user runs it: a real subprocess, exit codes and one readable error line."""

import json
import subprocess
import sys

import pytest


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
    ],
)
def test_bad_input_is_one_line_and_nonzero_exit(tmp_path, args, message):
    p = niyama(*args, "--output-dir", str(tmp_path))
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("niyama: error:") and message in lines[0]


def test_argument_errors_come_from_argparse(tmp_path):
    p = niyama("simulate", "--rate", "-3")
    assert p.returncode == 2 and "must be positive" in p.stderr
    p = niyama("capacity", "--schedulers", "fcfs,lifo")
    assert p.returncode == 2 and "unknown scheduler(s): lifo" in p.stderr


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
        (["bench", "--cv", "inf"], "argument --cv: must be a finite number"),
    ],
)
def test_values_no_run_can_use_are_refused_before_it_starts(args, message):
    p = niyama(*args)
    assert p.returncode == 2 and message in p.stderr.strip().splitlines()[-1]


def test_a_rate_too_low_for_the_duration_still_sends_one_request(tmp_path):
    p = niyama("simulate", "--rate", "1", "--duration", "0.001", "--output-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "sim-azure_code-niyama.json").read_text())["overall"]["requests"] == 1


def test_malformed_trace_and_profile_files_are_one_line(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("num_prefill_tokens,num_decode_tokens\n")
    not_profile = tmp_path / "list.json"
    not_profile.write_text("[]")
    for args, message in [(["--trace", str(empty)], "has no rows"),
                          (["--profile", str(not_profile)], "is not a batch-time profile")]:
        p = niyama("simulate", "--rate", "1", "--duration", "5", "--output-dir", str(tmp_path), *args)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and message in lines[0]
