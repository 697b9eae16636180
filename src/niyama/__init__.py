"""Niyama: a QoS-driven LLM inference server (scheduler, engine, simulator)."""

import os

# torch's OpenMP workers (libgomp) read this when torch is loaded, so it is set before any niyama module
# imports torch. A decode step launches ~120 matmuls a few microseconds apart: workers that sleep between
# them (OMP_WAIT_POLICY=PASSIVE) pay a wake-up each time (single-stream decode 30 instead of 47 tok/s on
# 2 cores), while libgomp's default spin (~1 ms) keeps the cores from the server's event loop and other
# processes after a step ends. ~0.1 ms of spinning gets both.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"
