"""OpenAI-compatible HTTP server with per-request QoS, on the live engine loop."""
