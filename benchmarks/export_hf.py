"""Write a model (default: the SmolLM2 GGUF) as a Hugging Face folder for peers that need one (vLLM).

    python benchmarks/export_hf.py OUT_DIR [--model PATH] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from niyama.engine import Tokenizer, load_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config, state = load_weights(args.model)
    dtype = getattr(torch, args.dtype)
    tensors = {k: v.to(dtype).contiguous() for k, v in state.items() if k != "rope_freqs"}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    (out / "config.json").write_text(json.dumps({**config.to_hf(), "torch_dtype": args.dtype}, indent=2))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    Tokenizer(args.model).save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
