"""Native CPU kernels (``kernels.c``): compiled for this machine on first use, loaded with ctypes.

The C file is built with the system's C compiler (``$CC``, else ``cc``) and ``-march=native`` into the
cache directory, keyed by the source, the flags and this CPU, so a machine builds it once (about a
second). Where no compiler works, ``load_native_kernels()`` returns None with one warning and the engine
keeps its torch path: nothing is lost but speed. OpenMP comes from the libgomp torch has already loaded,
so the kernels share torch's threads. ctypes releases the GIL for each call.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from niyama.cache import cache_dir, digest
from niyama.engine.config import cpu_info

if TYPE_CHECKING:
    from niyama.engine.attention import AttentionMetadata

log = logging.getLogger("niyama.engine")

SOURCE = Path(__file__).with_name("kernels.c")
# -ffast-math only to compile: linked in, it would add crtfastmath.o, which turns on flush-to-zero for the
# whole process when the library loads (subnormal floats would vanish everywhere, not just here).
COMPILE_FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp", "-fPIC")
LINK_FLAGS = ("-shared", "-fopenmp", "-lm")
MAX_HEAD_DIM, MAX_QUERY_ROWS, Q8_MAX_ROWS, Q4_MAX_ROWS, Q4_MAX_GROUPS = 256, 64, 8, 8, 512  # as in kernels.c


class Q4Weight(ctypes.Structure):
    """A 4-bit projection as ``kernels.c`` reads it (``niyama.engine.quantized.Int4Codes``)."""

    _fields_ = [("codes", ctypes.c_void_p), ("step", ctypes.c_void_p), ("low", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("out", ctypes.c_int64), ("in_", ctypes.c_int64)]


class Q4Layer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("qkv", Q4Weight), ("o", Q4Weight),
                ("gate_up", Q4Weight), ("down", Q4Weight), ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


class Q4Model(ctypes.Structure):
    """A model whose projections are all 4-bit, with its KV cache, for ``NativeKernels.q4_decode``."""

    _fields_ = [("layers", ctypes.POINTER(Q4Layer)), ("num_layers", ctypes.c_int32), ("heads", ctypes.c_int32),
                ("kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32), ("block_size", ctypes.c_int32),
                ("hidden", ctypes.c_int64), ("intermediate", ctypes.c_int64), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p)]


class MemoryList:
    """Tensors' memory as the kernels take it (addresses and sizes), built once; keeps the tensors alive."""

    def __init__(self, tensors: tuple[torch.Tensor, ...]):
        self.tensors = tensors
        self.arguments = ((ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors]),
                          (ctypes.c_int64 * len(tensors))(*[t.numel() * t.element_size() for t in tensors]),
                          len(tensors))


class NativeKernels:
    """Typed wrappers over the compiled library."""

    def __init__(self, lib: ctypes.CDLL):
        ptr, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float
        self._decode = lib.niyama_decode_attention
        self._decode.argtypes = [ptr, i64, ptr, ptr, ptr, i32, ptr, i32, i32, i32, i32, i32, f32, ptr, i64,
                                 ptr, ptr, i32, i32]
        self._decode.restype = ctypes.c_int
        self._rms_norm = lib.niyama_rms_norm
        self._rms_norm.argtypes = [ptr, i64, i64, ptr, f32, ptr, i32]
        self._add_rms_norm = lib.niyama_add_rms_norm
        self._add_rms_norm.argtypes = [ptr, ptr, i64, i64, ptr, f32, ptr, i32]
        self._silu_mul = lib.niyama_silu_mul
        self._silu_mul.argtypes = [ptr, i64, i64, ptr, i32]
        self._rope_store_kv = lib.niyama_rope_store_kv
        self._rope_store_kv.argtypes = [ptr, i64, i32, i32, i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, i32]
        self._rescored_logits = lib.niyama_rescored_logits
        self._rescored_logits.argtypes = [ptr, i64, i64, ptr, ptr, i64, i32, ptr, i32]
        self._argmax = lib.niyama_argmax
        self._argmax.argtypes = [ptr, i64, i64, ptr, i32]
        self._q8_linear = lib.niyama_q8_linear
        self._q8_linear.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, i32]
        self._q4_linear = lib.niyama_q4_linear
        self._q4_linear.argtypes = [ptr, i64, ctypes.POINTER(Q4Weight), ptr, i32]
        # Without a vector path (AVX512-VNNI or AVX2) the 4-bit kernels refuse every weight.
        self.q4_vectorized = bool(lib.niyama_q4_vectorized())
        self._q4_decode = lib.niyama_q4_decode
        self._q4_decode.argtypes = [ctypes.POINTER(Q4Model), ptr, i32, ptr, ptr, ptr, ptr, i32, ptr, i32]
        for f in (self._q4_linear, self._q4_decode):
            f.restype = ctypes.c_int
        for f in (self._rms_norm, self._add_rms_norm, self._silu_mul, self._rope_store_kv, self._rescored_logits,
                  self._argmax, self._q8_linear):
            f.restype = None

    @staticmethod
    def supports(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
        return head_dim <= MAX_HEAD_DIM and num_heads <= MAX_QUERY_ROWS

    def decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                         lens: torch.Tensor, out: torch.Tensor, ahead: MemoryList | None = None) -> None:
        """One query token per sequence over its cached context, written into ``out``.

        q ``[B, heads, head_dim]`` bf16 (rows may be strided); caches ``[blocks, block_size, kv_heads,
        head_dim]`` bf16; ``tables`` ``[B, width]`` int32 block tables; ``lens`` ``[B]`` int32 context
        lengths (the new token included); out ``[B, heads * head_dim]`` bf16 (rows may be strided).
        ``ahead``: memory the next steps will read (weights); threads done with their sequences (or given
        none) read it into the cache until all attention is done, since memory is otherwise idle meanwhile.
        """
        num_seqs, num_heads, head_dim = q.shape
        _, block_size, kv_heads, _ = k_cache.shape
        if not (q.stride(2) == 1 and q.stride(1) == head_dim and out.stride(1) == 1 and k_cache.is_contiguous()
                and v_cache.is_contiguous() and tables.is_contiguous() and lens.is_contiguous()):
            raise ValueError("decode_attention: unsupported tensor layout")
        status = self._decode(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                              tables.shape[1], lens.data_ptr(), num_seqs, kv_heads, num_heads // kv_heads, head_dim,
                              block_size, head_dim ** -0.5, out.data_ptr(), out.stride(0),
                              *(ahead.arguments if ahead is not None else (None, None, 0)), torch.get_num_threads())
        if status != 0:
            raise RuntimeError("decode_attention: unsupported shape")


    # The layer's element-wise steps, as ``niyama.engine.model.TorchOps`` computes them (bf16 only).

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x float32 ``[T, hidden]`` (contiguous), weight bf16; returns bf16."""
        out = torch.empty(x.shape, dtype=torch.bfloat16)
        self._rms_norm(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), eps, out.data_ptr(),
                       torch.get_num_threads())
        return out

    def add_rms_norm(self, h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``h += delta`` (float32 residual stream, in place; delta bf16), then its norm (bf16)."""
        delta = delta.contiguous()
        out = torch.empty(h.shape, dtype=torch.bfloat16)
        self._add_rms_norm(h.data_ptr(), delta.data_ptr(), h.shape[0], h.shape[1], weight.data_ptr(), eps,
                           out.data_ptr(), torch.get_num_threads())
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` from ``[T, 2 * inter]`` (gate first), bf16."""
        rows, width = gate_up.shape
        out = torch.empty(rows, width // 2, dtype=torch.bfloat16)
        self._silu_mul(gate_up.contiguous().data_ptr(), rows, width // 2, out.data_ptr(), torch.get_num_threads())
        return out

    def rope_store_kv(self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, cos: torch.Tensor,
                      sin: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, k_cache: torch.Tensor,
                      v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotary embedding in place on ``qkv``'s query and key heads, keys and values stored at their cache
        slots; returns q, k, v as views of ``qkv``."""
        qkv = qkv.contiguous()
        rows, head_dim = qkv.shape[0], cos.shape[1]
        self._rope_store_kv(qkv.data_ptr(), rows, num_heads, num_kv_heads, head_dim, cos.data_ptr(), sin.data_ptr(),
                            positions.data_ptr(), meta.slot_blocks.data_ptr(), meta.slot_offsets.data_ptr(),
                            k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1], torch.get_num_threads())
        q, k, v = qkv.view(rows, -1, head_dim).split((num_heads, num_kv_heads, num_kv_heads), dim=1)
        return q, k, v


    def rescored_logits(self, low: torch.Tensor, x: torch.Tensor, head: torch.Tensor, k: int) -> torch.Tensor:
        """Float32 logits from the bf16 ones ``low [N, vocab]``, each row's ``k`` highest recomputed exactly
        from the float32 ``head [vocab, dim]`` and the normed hidden states ``x [N, dim]``."""
        low, x = low.contiguous(), x.contiguous()
        out = torch.empty(low.shape, dtype=torch.float32)
        self._rescored_logits(low.data_ptr(), low.shape[0], low.shape[1], x.data_ptr(), head.data_ptr(),
                              head.shape[1], k, out.data_ptr(), torch.get_num_threads())
        return out

    def q8_linear(self, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Float32 ``x [N, in] . W^T`` (N <= 8) for ``W = scales [out, in / 32] (fp16) * codes [out, in] (int8)``,
        in float32 arithmetic."""
        if x.shape[0] > Q8_MAX_ROWS:
            raise ValueError(f"q8_linear: at most {Q8_MAX_ROWS} rows")
        x = x.float().contiguous()
        out = torch.empty(x.shape[0], codes.shape[0], dtype=torch.float32)
        self._q8_linear(x.data_ptr(), x.shape[0], x.shape[1], codes.data_ptr(), scales.data_ptr(), codes.shape[0],
                        out.data_ptr(), torch.get_num_threads())
        return out

    def q4_linear(self, x: torch.Tensor, weight: Q4Weight) -> torch.Tensor:
        """Bf16 ``x [N, in] . W^T`` (N <= 8) for a 4-bit ``weight``, float32 sums, bf16 out."""
        x = x.to(torch.bfloat16).contiguous()
        out = torch.empty(x.shape[0], weight.out, dtype=torch.bfloat16)
        if self._q4_linear(x.data_ptr(), x.shape[0], ctypes.byref(weight), out.data_ptr(), torch.get_num_threads()):
            raise ValueError(f"q4_linear: unsupported shape ({x.shape[0]} rows, {weight.in_} inputs)")
        return out

    def q4_decode(self, model: Q4Model, h: torch.Tensor, positions: torch.Tensor, slot_blocks: torch.Tensor,
                  slot_offsets: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor) -> None:
        """A decode step of ``h``'s rows (float32 ``[B, hidden]``, contiguous: embeddings in, the last layer's
        residual stream out) through every layer of ``model``. positions, slot blocks and offsets ``[B]`` int64;
        tables and lens as ``decode_attention``'s."""
        rows = h.shape[0]
        if not (h.dtype == torch.float32 and h.is_contiguous() and positions.dtype == slot_blocks.dtype
                == slot_offsets.dtype == torch.int64 and tables.dtype == lens.dtype == torch.int32
                and tables.is_contiguous() and positions.shape == slot_blocks.shape == slot_offsets.shape
                == lens.shape == (rows,) and tables.shape[0] == rows):
            raise ValueError("q4_decode: unsupported tensor layout")
        if self._q4_decode(ctypes.byref(model), h.data_ptr(), rows, positions.data_ptr(),
                           slot_blocks.data_ptr(), slot_offsets.data_ptr(), tables.data_ptr(), tables.shape[1],
                           lens.data_ptr(), torch.get_num_threads()):
            raise ValueError(f"q4_decode: unsupported shape ({rows} rows)")

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's first maximum of float32 ``x [N, V]`` (torch's ``max(dim).indices``)."""
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return x.max(dim=-1).indices
        x = x.contiguous()
        out = torch.empty(x.shape[0], dtype=torch.int64)
        self._argmax(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), torch.get_num_threads())
        return out


def library_path() -> Path:
    """Where this machine's build lives: keyed by the source, the flags and the CPU."""
    cpu = cpu_info()
    key = digest(SOURCE.read_text(), *COMPILE_FLAGS, *LINK_FLAGS, cpu.get("model name", ""), cpu.get("flags", ""))
    return cache_dir() / "kernels" / f"kernels-{key}.so"


def build(path: Path) -> None:
    """Compile ``kernels.c`` to ``path`` (atomically: concurrent builds of one file are harmless)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        obj, lib = Path(tmp) / "kernels.o", Path(tmp) / "kernels.so"
        for cmd in ([compiler, *COMPILE_FLAGS, "-c", str(SOURCE), "-o", str(obj)],
                    [compiler, str(obj), *LINK_FLAGS, "-o", str(lib)]):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                lines = done.stderr.strip().splitlines()
                raise RuntimeError(lines[-1] if lines else f"{compiler} failed")
        os.replace(lib, path)


@functools.cache
def load_native_kernels() -> NativeKernels | None:
    """The kernels for this machine, built if needed; None (with one warning) where they cannot be."""
    path = library_path()
    try:
        if not path.is_file():
            build(path)
        return NativeKernels(ctypes.CDLL(str(path)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("native kernels unavailable (%s); using torch attention", e)
        return None
