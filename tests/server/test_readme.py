"""The README's API examples, run as written against a real server (only the address changed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
ADDRESS = "http://127.0.0.1:8000"


def _block(language: str, containing: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)
    return next(b for b in blocks if containing in b)


def test_the_python_example_runs(server):
    code = _block("python", "OpenAI(base_url=").replace(ADDRESS, server.url)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "'slo_met'" in done.stdout and "flex batch-10m" in done.stdout


def test_the_curl_example_runs(server):
    script = _block("sh", "curl -s").replace(ADDRESS, server.url)
    done = subprocess.run(["sh", "-e", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert '"class":"batch-30m"' in done.stdout and 'niyama:request_slo_total{' in done.stdout
