"""What the two offline engine benchmarks share: the random prompts and the result block.

``bench_engine.py`` runs in the project's venv and ``vllm_engine.py`` in vLLM's own, so this module uses
the standard library only and is imported from the scripts' folder.
"""

from __future__ import annotations

import json
import random
from typing import Any


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def throughput(num_requests: int, prompt_len: int, output_len: int, elapsed: float, generated: int, total: int,
               decode_tok_s: float, ttft_s: float) -> dict[str, Any]:
    return {
        "workload": f"{num_requests} x ({prompt_len} -> {output_len}), ignore EOS",
        "elapsed_s": round(elapsed, 2),
        "output_tok_s": round(generated / elapsed, 1),
        "total_tok_s": round(total / elapsed, 1),
        "single_stream_decode_tok_s": round(decode_tok_s, 1),
        "single_stream_ttft_s": round(ttft_s, 3),
    }


def report(results: dict[str, Any], path: str | None) -> None:
    """Print the results as JSON, and write them to ``path`` when given."""
    print(json.dumps(results, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
