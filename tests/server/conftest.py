"""Real server processes (``python -m niyama.cli serve``) on the default model, driven over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

# Small iterations keep every test's latency bounded on 2 shared cores; the same for every scheduler.
MAX_BATCHED_TOKENS = 256
QOS_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "cpu-smollm2.toml"


class Server:
    def __init__(self, url: str, process: subprocess.Popen, log: Path, iteration_log: Path | None = None):
        self.url = url
        self.process = process
        self.log = log  # its stdout and stderr
        self.iteration_log = iteration_log  # where it writes one JSON line per iteration, if anywhere
        self.model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, **kw)

    def async_client(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, **kw)

    def metric(self, name: str) -> float:
        """The value of one unlabelled-by-us sample, e.g. ``niyama:num_requests_running``."""
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(cache_dir: Path, *args: str, timeout: float = 600.0, iteration_log: Path | None = None
          ) -> Iterator[Server]:
    """Start ``niyama serve`` in a subprocess, wait for /health, stop it at exit."""
    if iteration_log is not None:
        args = (*args, "--iteration-log", str(iteration_log))
    port = _free_port()
    env = {**os.environ, "NIYAMA_CACHE_DIR": str(cache_dir)}
    log = (cache_dir / f"server-{port}.log").open("w")
    cmd = [sys.executable, "-m", "niyama.cli", "serve", "--port", str(port), "--calibration-batches", "12",
           "--max-num-batched-tokens", str(MAX_BATCHED_TOKENS), "--qos-config", str(QOS_CONFIG), *args]
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {(cache_dir / f'server-{port}.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
            time.sleep(0.5)
        yield Server(url, process, cache_dir / f"server-{port}.log", iteration_log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One calibration per test session: every niyama server after the first reuses it."""
    return tmp_path_factory.mktemp("niyama-cache")


@pytest.fixture(scope="session")
def server(cache_dir) -> Iterator[Server]:
    with serve(cache_dir, "--scheduler", "niyama", iteration_log=cache_dir / "iterations.jsonl") as s:
        yield s
