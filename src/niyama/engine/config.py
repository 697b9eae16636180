"""Model architecture (Llama family) and engine settings."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Architectures that share the Llama layer structure (Qwen2 only adds q/k/v biases).
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None  # HF-style: {"rope_type": "llama3" | "linear", ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2); Llama's flag adds one on the output projection too
    mlp_bias: bool = False
    # Attention span of a sliding-window model (Mistral v0.1, some Qwen2). Requests are limited to it: full
    # attention within the window is what windowed attention computes.
    sliding_window: int | None = None
    architecture: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} attention heads cannot share {self.num_kv_heads} key/value heads")

    @property
    def context_length(self) -> int:
        """Most positions one request may use."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        """From a Hugging Face ``config.json`` dict (transformers 4 or 5 rope layout)."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported model_type {model_type!r} (supported: {SUPPORTED_ARCHITECTURES})")
        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r} (supported: silu)")
        # Mistral's window applies when set; Qwen2's only with use_sliding_window.
        windowed = model_type == "mistral" or cfg.get("use_sliding_window", False)
        heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        eos = cfg.get("eos_token_id")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else rope,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", model_type == "qwen2"),
            mlp_bias=cfg.get("mlp_bias", False),
            sliding_window=cfg.get("sliding_window") if windowed else None,
            architecture=model_type,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        )

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` dict for transformers (used for reference checks and vLLM exports)."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        model_type = self.architecture
        eos = self.eos_token_ids
        return {
            "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                               "qwen2": "Qwen2ForCausalLM"}[model_type]],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "sliding_window": self.sliding_window,
            **({"use_sliding_window": True} if self.sliding_window and model_type == "qwen2" else {}),
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else list(eos),
        }

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """KV-cache bytes one token occupies across all layers (keys and values)."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


BF16_CPU_FLAGS = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX"}  # /proc/cpuinfo flag -> name


@functools.cache
def cpu_info() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo (``model name``, ``flags``, ...); empty where it is missing."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are fast here: CUDA, or a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return not BF16_CPU_FLAGS.keys().isdisjoint(cpu_info().get("flags", "").split())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16, except on a GPU without bf16 support (float16 there)."""
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name == "auto":
        return torch.float16 if device.type == "cuda" and not native_bf16(device) else torch.bfloat16
    if name not in names:
        raise ValueError(f"unknown dtype {name!r} (expected auto, {', '.join(names)})")
    return names[name]


@dataclass(slots=True)
class EngineConfig:
    """Settings of one engine instance (model runner + KV cache + offline loop)."""

    model: str | None = None  # GGUF file or Hugging Face directory; None = the default SmolLM2 GGUF
    dtype: str = "auto"
    device: str = "cpu"
    kv_cache_memory: int = 1 << 30  # bytes for the paged KV cache
    block_size: int = 16
    max_num_batched_tokens: int = 512  # per iteration, decodes included (offline loop)
    max_num_seqs: int = 64  # running requests at once (offline loop)
    num_threads: int | None = None  # torch CPU threads; None = leave torch's default
    native_kernels: bool = True  # decode attention in the native kernel where it applies (bf16, CPU)
    quantized: bool = True  # small batches read the 4/8-bit codes of weights the file stores so (bf16, CPU)

    def __post_init__(self) -> None:
        for name in ("kv_cache_memory", "block_size", "max_num_batched_tokens", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def torch_device(self) -> torch.device:
        """``device`` checked: a known device type, and CUDA only where torch can use it."""
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"unknown device {self.device!r} (expected cpu, cuda or cuda:N)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("CUDA is not available (no GPU, or torch was installed without CUDA)")
        return device
