"""The model engine: Llama-family transformer, paged KV cache, mixed prefill/decode batches."""

from niyama.engine.config import EngineConfig, ModelConfig
from niyama.engine.kv_cache import KVCache, num_kv_blocks
from niyama.engine.llm_engine import Completion, LLMEngine
from niyama.engine.model_runner import ModelRunner
from niyama.engine.sampler import SamplingParams
from niyama.engine.tokenizer import Tokenizer
from niyama.engine.weights import default_model_path, load_weights

__all__ = ["Completion", "EngineConfig", "KVCache", "LLMEngine", "ModelConfig", "ModelRunner",
           "SamplingParams", "Tokenizer", "default_model_path", "load_weights", "num_kv_blocks"]
