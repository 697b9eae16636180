"""Benchmark client for OpenAI-compatible servers: open-loop load, SLO attainment, live capacity."""
