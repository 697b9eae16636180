"""Niyama: a QoS-driven LLM inference server (scheduler, engine, simulator)."""

import os

# torch's OpenMP workers (libgomp) read this when torch is loaded, so it is set before any niyama module
# imports torch. A decode step launches ~120 matmuls a few microseconds apart: workers that sleep between
# them (OMP_WAIT_POLICY=PASSIVE) pay a wake-up each time (single-stream decode 30 instead of 47 tok/s on
# 2 cores), while libgomp's default spin (~1 ms) keeps the cores from the server's event loop and other
# processes after a step ends. ~0.1 ms of spinning gets both.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
# oneDNN's and ideep's kernel caches (read when torch first builds a matmul primitive) hold 1,024 shapes by
# default, fewer than a server meets (every token count up to the batch budget × four projections): once
# full, shapes are evicted and their kernels generated again, iterations ~5-10% slower (docs/benchmarks.md,
# 2026-12-05). 16,384: four projections × every batch size up to 4,096 tokens.
for _cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_cache, "16384")

__version__ = "0.1.0"
