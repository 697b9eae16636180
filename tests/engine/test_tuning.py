"""Process tuning for the engine (glibc malloc; oneDNN cache sizes set on import), in a fresh interpreter."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

SCRIPT = """
import json, os
from niyama.engine.tuning import tune_process
tuned = tune_process()
print(json.dumps({"tuned": tuned, "onednn": os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"],
                  "ideep": os.environ["LRU_CACHE_CAPACITY"]}))
"""


CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def run(**caches: str) -> dict:
    """The script's report in a fresh interpreter whose environment sets only the cache sizes ``caches``."""
    env = {k: v for k, v in os.environ.items() if k not in CACHES} | caches
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_glibc_takes_the_malloc_settings_and_the_caches_grow():
    assert run() == {"tuned": True, "onednn": "16384", "ideep": "16384"}


def test_a_cache_size_the_user_set_is_kept():
    out = run(ONEDNN_PRIMITIVE_CACHE_CAPACITY="64", LRU_CACHE_CAPACITY="128")
    assert (out["onednn"], out["ideep"]) == ("64", "128")
