"""Fused Triton kernels for fastgen's decode step (CUDA only; fastgen/model.py keeps a plain-torch path for the rest).

A decode step at batch 24 is ~5.5 ms of weight-streaming GEMMs and, in plain torch, ~1,100 tiny elementwise
kernels (RMSNorm alone is 7 per call, RoPE 5 per tensor). Inside a CUDA graph each still costs ~2-3 us, so they
were ~3 ms of a ~10 ms step. Three kernels replace them, each reproducing HF's bf16 rounding op for op:

* add_rmsnorm: `x += delta` (the residual add, in place) then HF LlamaRMSNorm of x -> one launch instead of 8.
* rope_cache: RoPE on q and k straight from the fused qkv GEMM output, k and v written into cache slot `cur`
  (read from device memory, so graph replays need no host work) -> one launch instead of ~12.
* silu_mul: silu(gate) * up from the fused gate_up output -> one launch instead of 2.

Set FASTGEN_TRITON=0 to fall back to the torch ops (A/B timing, debugging). TRITON_INTERPRET=1 runs them on CPU.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: fastgen/model.py uses its torch path
    triton = None


def enabled(device: torch.device) -> bool:
    if triton is None or os.environ.get("FASTGEN_TRITON", "1") == "0":
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, delta_ptr, w_ptr, out_ptr, n_cols, eps,
                            HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < n_cols
        dtype = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * n_cols + cols, mask=inside, other=0.0)
        if HAS_DELTA:  # residual add, rounded to the model dtype like torch's bf16 add
            d = tl.load(delta_ptr + row * n_cols + cols, mask=inside, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(dtype)
            tl.store(x_ptr + row * n_cols + cols, x, mask=inside)
        xf = x.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        normed = (xf * inv).to(dtype)  # HF: normalise in fp32, cast, then scale in the model dtype
        w = tl.load(w_ptr + cols, mask=inside, other=0.0)
        tl.store(out_ptr + row * n_cols + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(dtype), mask=inside)

    @triton.jit
    def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pad_ptr, cur_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
                           n_q_heads, qkv_row_stride, cache_b_stride, cache_h_stride,
                           HEAD_DIM: tl.constexpr):
        b = tl.program_id(0)
        head = tl.program_id(1)  # 0..Nq-1: query heads; Nq..Nq+Nkv-1: key heads (each also copies its value head)
        half = tl.arange(0, HEAD_DIM // 2)
        dtype = q_ptr.dtype.element_ty
        cur = tl.load(cur_ptr)
        pos = cur - tl.load(pad_ptr + b)
        cos1 = tl.load(cos_ptr + pos * HEAD_DIM + half).to(tl.float32)
        cos2 = tl.load(cos_ptr + pos * HEAD_DIM + HEAD_DIM // 2 + half).to(tl.float32)
        sin1 = tl.load(sin_ptr + pos * HEAD_DIM + half).to(tl.float32)
        sin2 = tl.load(sin_ptr + pos * HEAD_DIM + HEAD_DIM // 2 + half).to(tl.float32)
        src = qkv_ptr + b * qkv_row_stride + head * HEAD_DIM
        x1 = tl.load(src + half).to(tl.float32)
        x2 = tl.load(src + HEAD_DIM // 2 + half).to(tl.float32)
        # HF apply_rotary_pos_emb in bf16: x*cos + cat(-x2, x1)*sin, every product and the sum rounded
        o1 = ((x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32)).to(dtype)
        o2 = ((x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)).to(dtype)
        if head < n_q_heads:
            dst = q_ptr + (b * n_q_heads + head) * HEAD_DIM
            tl.store(dst + half, o1)
            tl.store(dst + HEAD_DIM // 2 + half, o2)
        else:
            kv_head = head - n_q_heads
            slot = b * cache_b_stride + kv_head * cache_h_stride + cur * HEAD_DIM
            tl.store(k_cache_ptr + slot + half, o1)
            tl.store(k_cache_ptr + slot + HEAD_DIM // 2 + half, o2)
            n_kv_heads = tl.num_programs(1) - n_q_heads
            v_src = src + n_kv_heads * HEAD_DIM  # value head kv_head sits Nkv heads after key head kv_head
            full = tl.arange(0, HEAD_DIM)
            tl.store(v_cache_ptr + slot + full, tl.load(v_src + full))

    @triton.jit
    def _silu_mul_kernel(gate_up_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < n_cols
        dtype = out_ptr.dtype.element_ty
        gate = tl.load(gate_up_ptr + row * 2 * n_cols + cols, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * 2 * n_cols + n_cols + cols, mask=inside, other=0.0).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype)  # F.silu in bf16: fp32 math, one rounding
        tl.store(out_ptr + row * n_cols + cols, (act.to(tl.float32) * up).to(dtype), mask=inside)


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (B, H) contiguous: x += delta in place (if given); return rms_norm(x) * weight, (B, H)."""
    out = torch.empty_like(x)
    block = triton.next_power_of_2(x.shape[1])
    _add_rmsnorm_kernel[(x.shape[0],)](x, x if delta is None else delta, weight, out, x.shape[1], eps,
                                       HAS_DELTA=delta is not None, BLOCK=block, num_warps=8)
    return out


def rope_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pad_len: torch.Tensor, cur: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """qkv (B, (Nq+2Nkv)D) -> rotated q (B, Nq, D); rotated k and v stored at slot cur of the (B, Nkv, L, D) caches."""
    b, d = qkv.shape[0], k_cache.shape[-1]
    assert k_cache.stride(-1) == 1 and k_cache.stride(-2) == d and k_cache.stride() == v_cache.stride()
    q = torch.empty(b, n_heads, d, device=qkv.device, dtype=qkv.dtype)
    _rope_cache_kernel[(b, n_heads + n_kv_heads)](qkv, cos, sin, pad_len, cur, q, k_cache, v_cache, n_heads,
                                                   qkv.stride(0), k_cache.stride(0), k_cache.stride(1),
                                                   HEAD_DIM=d, num_warps=1)
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (B, 2I) -> silu(gate) * up, (B, I)."""
    rows, n_cols = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, n_cols, device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(n_cols, block))](gate_up, out, n_cols, BLOCK=block, num_warps=4)
    return out
