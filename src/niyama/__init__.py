"""Niyama: a QoS-driven LLM inference server (scheduler, engine, simulator)."""

__version__ = "0.1.0"
