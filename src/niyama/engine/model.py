"""Llama-family transformer (Llama 2/3, SmolLM2, Mistral, Qwen2) over a flattened mixed batch.

Plain tensors rather than ``nn.Module``s keep the per-layer Python overhead low (decode steps of a
135M model are dominated by it). q/k/v and gate/up projections are fused into one matmul each.
Numerics follow Hugging Face transformers (RMSNorm in float32, rotate-half rotary embeddings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from niyama.engine.attention import AttentionMetadata, DecodeBatch, paged_attention, write_kv
from niyama.engine.config import ModelConfig, native_bf16
from niyama.engine.kv_cache import KVCache
from niyama.engine.native import MemoryList, NativeKernels, Q4Layer, Q4Model, load_native_kernels
from niyama.engine.quantized import Int4Codes, Int8Codes, file_codes


def rope_inv_freq(config: ModelConfig, rope_freqs: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary inverse frequencies with the config's scaling (none, linear or Llama 3)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope_freqs is not None:  # GGUF stores Llama 3 scaling as per-frequency divisors
        return inv_freq / rope_freqs.float()
    scaling = dict(config.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind is None:
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling {kind!r} (supported: linear, llama3)")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 (as transformers does); the result has the weight's dtype."""
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(weight.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[T, heads, head_dim]``; cos/sin ``[T, 1, head_dim]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class TorchOps:
    """A layer's element-wise steps in torch, for any dtype and device (``NativeKernels`` has the same
    methods, fused, for bf16 on the CPU)."""

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    @staticmethod
    def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``h += delta`` (the float32 residual stream, in place), then its norm."""
        h += delta
        return rms_norm(h, weight, eps)

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def rope_store_kv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                      positions: torch.Tensor, meta: AttentionMetadata, k_cache: torch.Tensor, v_cache: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotary embedding on the query and key heads of ``qkv`` rows, keys and values stored in the cache;
        returns q, k, v ``[T, heads, head_dim]``. cos/sin: tables ``[positions, head_dim]``."""
        num_tokens, head_dim = qkv.shape[0], cos.shape[1]
        rotated = apply_rope(qkv[:, :(num_heads + num_kv_heads) * head_dim].view(num_tokens, -1, head_dim),
                             cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
        q, k = rotated.split((num_heads, num_kv_heads), dim=1)
        v = qkv[:, (num_heads + num_kv_heads) * head_dim:].view(num_tokens, num_kv_heads, head_dim)
        write_kv(k_cache, v_cache, k, v, meta)
        return q, k, v


RESCORED = 32  # candidates per row whose logits a bf16 batch recomputes in float32 (see ``logits``)


class Linear:
    """A projection weight ``[out, in]`` in the model dtype, in one of three layouts:

    - ``PACKED``: on CPUs with native bf16 (AVX512-BF16/AMX) the bf16 weight is reordered once into
      oneDNN's blocked layout. torch's plain bf16 matmul reorders it on every call: all 30 layers of
      SmolLM2 at one row take 17.5 ms plain and 11.3 ms packed on a 2-core Xeon with AMX (64 rows: 25
      vs 17 ms; 512 rows about equal; 2,048 rows 329 vs 248 ms), with bit-identical results.
    - ``WIDE``: where bf16 matmuls are only emulated (CPUs without AVX512-BF16/AMX, ~5x slower than
      float32), a float32 copy of the bf16 weight serves batches above ``SMALL_BATCH`` rows: bf16 inputs
      times bf16 weights, accumulated in float32 and rounded to bf16 -- the same arithmetic as a native
      bf16 matmul, at float32 speed. Small batches (decode) read the bf16 weight: half the memory traffic.
    - ``PLAIN``: ``F.linear`` on the weight as it is (float32, CUDA).

    With ``codes`` (bf16 on the CPU with native kernels, a weight the model file stores in 4 or 8 bits:
    ``niyama.engine.quantized``), batches of at most ``CODES_BATCH`` rows read those codes instead.
    """

    PLAIN, PACKED, WIDE = "plain", "packed", "wide"
    # Rows up to which small batches take other kernels. WIDE: the measured crossover on a 2-core AVX2 EPYC
    # (all layers: 44 ms either way at 6 rows). Codes: the kernels' limit (a whole decode step on a 2-core Xeon
    # with AMX, 2026-12-06, a slow spell: 5.3 vs 32 ms bf16 at 1 row, 19 vs 42 at 6, 25 vs 37 at 8).
    SMALL_BATCH = 6
    CODES_BATCH = 8

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, layout: str,
                 codes: Int4Codes | Int8Codes | None = None, kernels: NativeKernels | None = None):
        self.packed = layout == self.PACKED
        self.weight = pack(weight) if self.packed else weight
        self.bias = bias
        self.weight32 = weight.float() if layout == self.WIDE else None
        self.bias32 = None if bias is None or self.weight32 is None else bias.float()
        self.codes = codes
        self.kernels = kernels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.codes is not None and x.shape[0] <= self.CODES_BATCH:
            y = self.codes(x, self.kernels)
            y = y if y.dtype == torch.bfloat16 else y.to(torch.bfloat16)  # codes exist only with bf16 native kernels
            return y if self.bias is None else y + self.bias
        if self.packed:
            return packed_linear(x.to(torch.bfloat16), self.weight, self.bias)
        if self.weight32 is None or x.shape[0] <= self.SMALL_BATCH:
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        return F.linear(x.to(self.weight.dtype).float(), self.weight32, self.bias32).to(self.weight.dtype)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 weight ``[out, in]`` in oneDNN's blocked layout (an opaque tensor only ``packed_linear`` reads).
    The layout is chosen for one-row inputs; on the machine above it was also the fastest up to 1,024 rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


def linear_layout(dtype: torch.dtype, device: torch.device) -> str:
    if dtype != torch.bfloat16:
        return Linear.PLAIN
    if not native_bf16(device):
        return Linear.WIDE
    return Linear.PACKED if device.type == "cpu" and torch.backends.mkldnn.is_available() else Linear.PLAIN


@dataclass(slots=True)
class Layer:
    attn_norm: torch.Tensor
    qkv: Linear  # [(heads + 2 * kv_heads) * head_dim, hidden]
    o: Linear
    mlp_norm: torch.Tensor
    gate_up: Linear  # [2 * intermediate, hidden]
    down: Linear
    # What a small batch reads after its attention (the codes of o, gate_up and down): the attention kernel's
    # threads read it into the cache once done with their sequences, while the others still attend.
    ahead: MemoryList | None = None

    @property
    def projections(self) -> tuple[Linear, Linear, Linear, Linear]:
        """qkv, o, gate_up, down: the order ``niyama_q4_decode``'s layers take them in."""
        return self.qkv, self.o, self.gate_up, self.down


class FusedDecode:
    """Decode steps of a few sequences through every layer in one native call (``niyama_q4_decode``), for a
    model whose projections all have 4-bit codes: no per-op call, thread wake-up or pause of the memory
    stream between the ~10 ops of each layer. The same arithmetic as the per-op path on those codes."""

    def __init__(self, model: LlamaModel, kv_cache: KVCache):
        cfg = model.config
        self.kv_cache = kv_cache
        layers = []
        for i, layer in enumerate(model.layers):
            k_cache, v_cache = kv_cache.layer(i)
            weights = [x.codes.native(x.bias) for x in layer.projections]
            layers.append(Q4Layer(layer.attn_norm.data_ptr(), layer.mlp_norm.data_ptr(), *weights,
                                  k_cache.data_ptr(), v_cache.data_ptr()))
        self.layers = (Q4Layer * len(layers))(*layers)
        self.model = Q4Model(self.layers, len(layers), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                             kv_cache.block_size, cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps,
                             cfg.head_dim ** -0.5, model.cos.data_ptr(), model.sin.data_ptr())
        self.kernels = model.kernels

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        """``h``: the batch's embeddings (float32, one row per sequence), replaced by the last layer's output."""
        decodes = meta.decodes
        assert isinstance(decodes, DecodeBatch)
        self.kernels.q4_decode(self.model, h, positions, meta.slot_blocks, meta.slot_offsets, decodes.tables,
                               decodes.lens)


class LlamaModel:
    def __init__(self, config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str = "cpu", native_kernels: bool = True, quantized: bool = True):
        """``native_kernels``: the element-wise steps and decode attention in native kernels where they apply
        (bf16 on the CPU, ``niyama.engine.native``). ``quantized``: small batches read the codes of the
        weights that the model file stores in 4 or 8 bits (with the native kernels, ``niyama.engine.quantized``)."""
        self.config = config
        self.dtype = dtype
        # Element-wise steps and decode attention in native kernels (fused; attention reads the KV blocks in
        # place), else in torch (attention: gather + SDPA).
        self.kernels: NativeKernels | None = None
        if (native_kernels and dtype == torch.bfloat16 and torch.device(device).type == "cpu"
                and NativeKernels.supports(config.num_heads, config.num_kv_heads, config.head_dim)):
            self.kernels = load_native_kernels()
        self.ops: NativeKernels | TorchOps = self.kernels or TorchOps()

        def tensor(name: str) -> torch.Tensor:
            if name not in state:
                raise ValueError(f"the weights have no tensor {name!r} that the model config calls for")
            return state[name]

        def w(name: str) -> torch.Tensor:
            return tensor(name).to(device=device, dtype=dtype).contiguous()

        def bias(names: list[str], present: bool) -> torch.Tensor | None:
            return torch.cat([w(n) for n in names]) if present else None

        layout = linear_layout(dtype, torch.device(device))
        quantized = quantized and self.kernels is not None

        def linear(names: list[str], bias_names: list[str], has_bias: bool) -> Linear:
            weight = torch.cat([tensor(n) for n in names])
            codes = file_codes(weight) if quantized else None
            if isinstance(codes, Int4Codes) and not self.kernels.q4_vectorized:
                codes = None
            return Linear(weight.to(device=device, dtype=dtype).contiguous(), bias(bias_names, has_bias), layout,
                          codes, self.kernels)

        self.wide = layout == Linear.WIDE

        self.embed = w("model.embed_tokens.weight")
        # Logits are computed in float32 whatever the dtype: bf16 rounding (8 bits of mantissa) of logits
        # creates ties and flips the top token at close calls.
        head = tensor("model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight")
        self.lm_head = head.to(device=device, dtype=torch.float32).contiguous()
        # Decode steps are bound by reading weights, and the float32 head is the largest single read:
        # small batches (any batch, with native bf16) take bf16 logits first and recompute only their top
        # candidates in float32.
        # (WIDE serves only small batches from it: no float32 copy beside ``lm_head``.)
        self.lm_head_low = None
        if dtype == torch.bfloat16:
            head_layout = Linear.PLAIN if layout == Linear.WIDE else layout
            self.lm_head_low = Linear(head.to(device=device, dtype=dtype).contiguous(), None, head_layout)
        self.norm = tensor("model.norm.weight").to(device=device, dtype=torch.float32)
        o_bias = config.attention_bias and config.architecture != "qwen2"  # Llama's flag covers o_proj too
        self.layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            qkv, gate_up = [f"{attn}{x}_proj" for x in "qkv"], [mlp + "gate_proj", mlp + "up_proj"]
            self.layers.append(Layer(
                attn_norm=w(p + "input_layernorm.weight"),
                qkv=linear([n + ".weight" for n in qkv], [n + ".bias" for n in qkv], config.attention_bias),
                o=linear([attn + "o_proj.weight"], [attn + "o_proj.bias"], o_bias),
                mlp_norm=w(p + "post_attention_layernorm.weight"),
                gate_up=linear([n + ".weight" for n in gate_up], [n + ".bias" for n in gate_up], config.mlp_bias),
                down=linear([mlp + "down_proj.weight"], [mlp + "down_proj.bias"], config.mlp_bias),
            ))
            layer = self.layers[-1]
            after = (layer.o.codes, layer.gate_up.codes, layer.down.codes)
            ahead = tuple(t for codes in after if codes is not None for t in codes.tensors)
            layer.ahead = MemoryList(ahead) if ahead else None
        # The head's 8-bit codes, for small batches: exact float32 logits of the file's weights.
        head_codes = file_codes(head) if quantized else None
        self.head_codes = head_codes if isinstance(head_codes, Int8Codes) else None
        self.quantized = self.head_codes is not None or any(
            x.codes is not None for layer in self.layers for x in layer.projections)
        # Decode steps of at most CODES_BATCH sequences run in one native call when every projection has
        # 4-bit codes (``FusedDecode``, built for the KV cache it is given).
        self.fused_decode = all(isinstance(x.codes, Int4Codes) for layer in self.layers for x in layer.projections)
        self._fused: FusedDecode | None = None
        # Batches of at most this many rows run other kernels (bf16 or quantized weights) and cost much less.
        self.small_batch_rows = Linear.CODES_BATCH if self.quantized else Linear.SMALL_BATCH if self.wide else None
        inv_freq = rope_inv_freq(config, state.get("rope_freqs")).to(device)
        positions = torch.arange(config.context_length, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        self.cos = angles.cos().to(dtype)
        self.sin = angles.sin().to(dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: KVCache) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` (float32, before the final norm) for a flattened batch.

        The residual stream stays in float32 whatever the dtype; matmuls run in the model dtype.
        """
        cfg, ops = self.config, self.ops
        eps = cfg.rms_norm_eps
        small = input_ids.shape[0] <= Linear.CODES_BATCH
        h = F.embedding(input_ids, self.embed).float()
        if small and self.fused_decode and not meta.prefills:
            if self._fused is None or self._fused.kv_cache is not kv_cache:
                self._fused = FusedDecode(self, kv_cache)
            self._fused(h, positions, meta)
            return h
        x = ops.rms_norm(h, self.layers[0].attn_norm, eps)
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = kv_cache.layer(i)
            q, k, v = ops.rope_store_kv(layer.qkv(x), cfg.num_heads, cfg.num_kv_heads, self.cos, self.sin, positions,
                                        meta, k_cache, v_cache)
            attention = paged_attention(q, k, v, k_cache, v_cache, meta, self.kernels, layer.ahead if small else None)
            x = ops.add_rms_norm(h, layer.o(attention), layer.mlp_norm, eps)
            down = layer.down(ops.silu_mul(layer.gate_up(x)))
            if i + 1 < len(self.layers):
                x = ops.add_rms_norm(h, down, self.layers[i + 1].attn_norm, eps)
            else:
                h += down
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[N, vocab]`` for selected rows of ``forward``'s output.

        In bf16, for batches of at most ``Linear.SMALL_BATCH`` rows (any batch where bf16 is native), only the
        ``RESCORED`` highest logits of each row are exact; the rest carry bf16 rounding (about 0.4%), which
        moves no greedy choice and only the far tail of a sampled distribution. A head the model file stores
        in 8 bits gives batches of at most ``Linear.CODES_BATCH`` rows exact logits, read as its codes.
        """
        x = rms_norm(hidden, self.norm, self.config.rms_norm_eps)
        if self.head_codes is not None and x.shape[0] <= Linear.CODES_BATCH:
            return self.head_codes(x, self.kernels)
        if self.lm_head_low is None or (self.wide and x.shape[0] > Linear.SMALL_BATCH):
            return F.linear(x, self.lm_head)
        if self.kernels is not None:
            return self.kernels.rescored_logits(self.lm_head_low(x), x, self.lm_head, RESCORED)
        logits = self.lm_head_low(x).float()
        top = logits.topk(RESCORED, dim=-1).indices
        exact = torch.einsum("nkd,nd->nk", self.lm_head[top], x)
        return logits.scatter_(1, top, exact)
