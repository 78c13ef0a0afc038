"""Split-K ("flash-decoding") GQA attention for one decode step, as a Triton kernel pair (CUDA graph safe).

Why: fastgen's decode step called SDPA with an additive (B, 1, 1, L) mask. That path reads the whole attended
cache [0, attend_len) at about half the achievable bandwidth (~28.5 us/layer at batch 24 on an H100), and reads
the invisible slots (left padding, and the not-yet-written end of the attend_len bucket) too.

How: program (b, kv head, split) streams K/V tiles of its share of row b's visible slots [pad_len[b], cur] once
for all G query heads of that KV head (q is a (G, D) tile padded to 16 rows for tl.dot), with an fp32 online
softmax; a second kernel merges the splits through their log-sum-exps. The visible range is divided among the
splits on the device, so no slot outside it is read and every split of a row gets an equal share. pad_len and cur
are read in the kernels: a captured graph replays correctly after they change in place. A row with no visible slot
gives zeros (SDPA gives NaN); fastgen never has one.

Numerics: scores are bf16 q.k products summed in fp32 (tensor cores), scaled and soft-maxed in fp32; the weights
enter P@V as bf16 hi + lo halves (two MMAs, nearly fp32-exact, unlike flash attention's single bf16 rounding);
splits are merged in fp32 and the output is rounded once to q's dtype.

Kernel variants (constexprs, specialised ints) depend only on (dtype, G, D, whether B * Nkv fills the GPU), never
on attend_len or the split count, so fastgen's eager warm-up step compiles everything before any graph capture.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: decode_attention falls back to SDPA
    triton = None

MAX_SPLITS = 16  # the combine kernel loads all splits of a row as one tile
LOG2E = 1.4426950408889634


if triton is not None:

    @triton.jit(do_not_specialize=["attend_len"])
    def _split_kernel(q_ptr, k_ptr, v_ptr, pad_ptr, cur_ptr, part_o_ptr, part_lse_ptr, out_ptr,
                      attend_len, qk_scale, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                      GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                      DIRECT: tl.constexpr, UPCAST: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        n_splits = tl.num_programs(2)
        n_q_heads = tl.num_programs(1) * GROUP
        # this split's share of the visible slots [pad, end); never past attend_len
        pad = tl.load(pad_ptr + b).to(tl.int32)
        end = tl.minimum(tl.load(cur_ptr).to(tl.int32) + 1, attend_len)
        chunk = tl.cdiv(tl.maximum(end - pad, 0), n_splits)
        lo = pad + split * chunk
        hi = tl.minimum(lo + chunk, end)

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        n = tl.arange(0, BLOCK_N)
        heads = kvh * GROUP + g  # query heads of this KV head (rows >= GROUP are padding)
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=g[:, None] < GROUP, other=0.0)
        k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + kvh * stride_vh

        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max of scores, log2 units
        l_i = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp2(score - m_i)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            slots = start + n
            valid = slots < hi  # every tile has >= 1 valid slot, so m_i is finite after the first
            offs = slots[:, None] * HEAD_DIM + d[None, :]
            k = tl.load(k_base + offs, mask=valid[:, None], other=0.0)
            if UPCAST:  # Triton's interpreter (3.9) multiplies bf16 tiles as raw uint16 bits: do it in fp32
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
            else:
                s = tl.dot(q, tl.trans(k))  # bf16 products, fp32 accumulation
            s = s * qk_scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs, mask=valid[:, None], other=0.0)
            if UPCAST:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
            else:  # p as hi + lo halves: fp32-accurate weights for two cheap MMAs (the loads are the cost)
                p_hi = p.to(v.dtype)
                p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
                acc = acc * alpha[:, None] + tl.dot(p_hi, v) + tl.dot(p_lo, v)
            m_i = m_new

        seen = l_i > 0  # false for an empty split: neutral partial (o = 0, lse = -inf), never NaN
        o = acc / tl.where(seen, l_i, 1.0)[:, None]
        rows = b * n_q_heads + heads
        if DIRECT:  # one split: it is the answer
            tl.store(out_ptr + rows[:, None] * HEAD_DIM + d[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=g[:, None] < GROUP)
        else:
            part = rows * n_splits + split
            tl.store(part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], o, mask=g[:, None] < GROUP)
            tl.store(part_lse_ptr + part, tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf")),
                     mask=g < GROUP)

    @triton.jit(do_not_specialize=["n_splits"])  # S = 16 must not compile a new variant inside a graph capture
    def _combine_kernel(part_o_ptr, part_lse_ptr, out_ptr, n_splits,
                        HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr):
        row = tl.program_id(0)  # b * Nq + query head
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, HEAD_DIM)
        inside = s < n_splits
        lse = tl.load(part_lse_ptr + row * n_splits + s, mask=inside, other=float("-inf"))
        top = tl.max(lse, 0)
        w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # 0 for empty splits
        total = tl.sum(w, 0)
        o = tl.load(part_o_ptr + (row * n_splits + s[:, None]) * HEAD_DIM + d[None, :], mask=inside[:, None],
                    other=0.0)
        out = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


def kernel_supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether decode_attention runs the Triton kernels for these tensors (else it falls back to SDPA)."""
    return q.is_contiguous() and shape_supported(q.device, q.dtype, tuple(q.shape), k_cache, v_cache)


def shape_supported(device: torch.device, dtype: torch.dtype, q_shape: tuple[int, int, int],
                    k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """kernel_supported before the queries exist: Triton present, CUDA (or TRITON_INTERPRET=1), bf16/fp16,
    head_dim a power of two in [16, 256], Nq a multiple of Nkv with G <= 64, (L, D)-contiguous caches with
    equal strides."""
    if triton is None or not (device.type == "cuda" or _interpreting()):
        return False
    b, nq, d = q_shape
    nkv = k_cache.shape[1]
    return (dtype in (torch.bfloat16, torch.float16) and k_cache.dtype == dtype == v_cache.dtype
            and 16 <= d <= 256 and d & (d - 1) == 0 and nq % nkv == 0 and nq // nkv <= 64
            and k_cache.shape == v_cache.shape and k_cache.shape[0] == b
            and k_cache.shape[-1] == d and k_cache.stride(-1) == 1 and k_cache.stride(-2) == d
            and v_cache.stride(-1) == 1 and v_cache.stride(-2) == d)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int | None) -> int:
    if not torch.cuda.is_available():
        return 132  # interpreter runs: pretend H100
    return torch.cuda.get_device_properties(device_index or 0).multi_processor_count


def num_splits(batch: int, n_kv_heads: int, attend_len: int, device: torch.device) -> int:
    """Splits per (row, KV head): 1 when B * Nkv programs already give ~4 per SM (eval batches), else enough
    for ~4 per SM, at least 2 (so the kernel variant does not change with attend_len), ~64+ slots each."""
    target = 4 * _sm_count(device.index if device.type == "cuda" else None)
    pairs = batch * n_kv_heads
    if pairs >= target:
        return 1
    return max(2, min(MAX_SPLITS, -(-target // pairs), -(-attend_len // 64)))


def _partials(rows: int, splits: int, head_dim: int, device: torch.device):
    """Per-split outputs (fp32, normalised) and log2-sum-exps; a function so tests can poison them."""
    return (torch.empty(rows, splits, head_dim, device=device, dtype=torch.float32),
            torch.empty(rows, splits, device=device, dtype=torch.float32))


def decode_attention(q, k_cache, v_cache, pad_len, cur, attend_len: int, scale: float | None = None, *,
                     out: torch.Tensor | None = None, splits: int | None = None, block_n: int | None = None,
                     num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """q (B, Nq, D) bf16/fp16 contiguous; k_cache, v_cache (B, Nkv, L, D) views with stride(-1)==1, stride(-2)==D
    (they are st.kv[i, 0] and st.kv[i, 1] of a (layers, 2, B, Nkv, L, D) tensor, so batch/head strides are NOT
    the contiguous ones of a (B,Nkv,L,D) tensor: pass strides to the kernel); pad_len (B,) int64 on device; cur (1,)
    int64 on device (the slot just written; visible slots are pad_len[b] <= s <= cur); attend_len: python int, only
    slots < attend_len may be read (a static bound; cur < attend_len always). Returns (B, Nq, D) in q's dtype.
    Query head h uses KV head h // (Nq // Nkv).

    Keyword-only knobs for tests and the bench: `out` (B, Nq, D) to write into; `splits`, `block_n`, `num_warps`,
    `num_stages` override the launch heuristics. Unsupported shapes (see kernel_supported) run SDPA instead."""
    b, nq, d = q.shape
    nkv = k_cache.shape[1]
    scale = d ** -0.5 if scale is None else scale
    if not kernel_supported(q, k_cache, v_cache):
        result = _sdpa(q, k_cache, v_cache, pad_len, cur, attend_len, scale)
        return result if out is None else out.copy_(result)
    group = nq // nkv
    splits = splits or num_splits(b, nkv, attend_len, q.device)
    block_n = block_n or (64 if d <= 128 else 32)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    part_o, part_lse = (out, out) if splits == 1 else _partials(b * nq, splits, d, q.device)
    _split_kernel[(b, nkv, splits)](
        q, k_cache, v_cache, pad_len, cur, part_o, part_lse, out, attend_len, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, BLOCK_N=block_n,
        DIRECT=splits == 1, UPCAST=_interpreting() and q.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        _combine_kernel[(b * nq,)](part_o, part_lse, out, splits, HEAD_DIM=d,
                                   SPLITS_PAD=max(MAX_SPLITS, triton.next_power_of_2(splits)), num_warps=2)
    return out


def _visible(pad_len, cur, attend_len: int) -> torch.Tensor:
    slots = torch.arange(attend_len, device=pad_len.device)
    return (slots[None] >= pad_len[:, None]) & (slots[None] <= cur)  # (B, attend_len)


def _sdpa(q, k_cache, v_cache, pad_len, cur, attend_len: int, scale: float) -> torch.Tensor:
    """The old path (fastgen_model._attend's SDPA call with its additive mask), for unsupported shapes."""
    b, nq, d = q.shape
    nkv = k_cache.shape[1]
    visible = _visible(pad_len, cur, attend_len)
    mask = torch.zeros(visible.shape, device=q.device, dtype=q.dtype).masked_fill_(~visible, float("-inf"))
    out = F.scaled_dot_product_attention(q.view(b, nkv, nq // nkv, d), k_cache[:, :, :attend_len],
                                         v_cache[:, :, :attend_len], attn_mask=mask[:, None, None], scale=scale)
    return out.reshape(b, nq, d)


def decode_attention_reference(q, k_cache, v_cache, pad_len, cur, attend_len: int,
                               scale: float | None = None) -> torch.Tensor:
    """Plain-torch decode_attention: fp32 maths (fp64 for fp64 inputs), one rounding to q's dtype. Invisible slots
    are dropped outright (their K/V never reach the sums, even non-finite), and a row with no visible slot gives
    zeros, as the kernel does."""
    b, nq, d = q.shape
    nkv = k_cache.shape[1]
    scale = d ** -0.5 if scale is None else scale
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    hidden = ~_visible(pad_len, cur, attend_len)  # (B, L)
    k = k_cache[:, :, :attend_len].to(dtype)
    v = v_cache[:, :, :attend_len].to(dtype).masked_fill(hidden[:, None, :, None], 0)
    scores = torch.einsum("bhgd,bhld->bhgl", q.to(dtype).reshape(b, nkv, nq // nkv, d), k) * scale
    probs = torch.softmax(scores.masked_fill(hidden[:, None, None], float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhgl,bhld->bhgd", probs, v).reshape(b, nq, d).to(q.dtype)


__all__ = ["decode_attention", "decode_attention_reference", "kernel_supported", "num_splits",
           "shape_supported"]
