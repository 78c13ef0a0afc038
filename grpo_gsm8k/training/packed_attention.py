"""Causal attention over padded GRPO batches without a padding mask, so SDPA can take its flash kernel.

A GRPO training or scoring forward sees rows laid out `[left pads][prompt][completion][right pads]`. HF builds a
(B, 1, L, L) boolean mask for them, and SDPA with a mask cannot use its flash kernel: on an H100 it ran the
memory-efficient kernels, every key block computed, 0.13 s of an optimizer step at the study's shape
(bench/RESULTS.md, read by bench/trace_kernels.py). With the real tokens of each row moved, in order, to the front,
"causal over the real tokens" is plain `is_causal=True`, which SDPA runs on flash, skipping the blocks above the
diagonal:

    original  [p p a b c d x x]   query c sees keys {a, b, c}: causal, and not a pad
    packed    [a b c d p p x x]   query c sees keys {a, b, c}: causal, nothing else needed

The query, key and value rows are permuted after RoPE, so every token keeps its own position; the output goes back
to the original order. Each real query attends exactly the keys it attended before, so the result is the same up
to the kernels' rounding. Pad queries (moved to the back) see real keys too; their outputs are finite and unused:
no real query sees a pad key, and the loss masks pad positions, so their gradient is zero.

    use_packed_causal_attention(model)  # on the HF causal LM, before training

A forward whose rows were packed into one sequence (training/trimmed_logps.py, on CUDA in half precision) passes
`sequence_bounds` as its attention mask instead: attention then runs per sequence, causal, on flash's
variable-length kernel, so no position is a pad at all.

Everything else (a KV cache in `generate`, offsets, custom mask functions, eager attention) goes through HF's
own SDPA mask and attention unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "sdpa_packed_causal"


def real_tokens_first(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 padding mask -> (B, L) int64: the columns of each row's real tokens, in order, then of its pads."""
    return torch.argsort((attention_mask == 0).to(torch.int8), dim=1, stable=True)


def packing_order(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 padding mask -> (2, B, W) int64, W the next multiple of 8 above L: [0] `real_tokens_first`, then
    column 0 again; [1] its inverse (which puts them back), then zeros.

    Why W: flash attention's backward takes a (B, H, length) log-sum-exp, and Inductor compiles its kernels for that
    length's alignment to 8 and guards it, so lengths of the other kind recompiled the layers (once for each,
    ~20 s on an H100). A packed length always a multiple of 8 has one kind; always above L, it never equals L, which
    would let torch.compile tie the two sizes together. The extra positions come last: causal, no real query
    sees them, and their outputs are dropped."""
    order = real_tokens_first(attention_mask)
    both = torch.stack([order, torch.argsort(order, dim=1)])
    width = 8 * (order.shape[1] // 8 + 1)
    return F.pad(both, (0, width - order.shape[1]))


def _is_packing_order(mask) -> bool:
    return isinstance(mask, torch.Tensor) and mask.dtype == torch.int64 and mask.ndim == 3


def packed_causal_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                       attention_mask=None, **kwargs):
    """HF mask interface: the packing order for a full causal forward over a padded batch, else HF's SDPA mask."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    full_causal_forward = (mask_function is causal_mask_function and attention_mask is not None
                           and attention_mask.ndim == 2 and q_length == kv_length == attention_mask.shape[1]
                           and isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0)
    if full_causal_forward:
        return packing_order(attention_mask)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)


def sequence_bounds(lengths: torch.Tensor) -> torch.Tensor:
    """(S,) lengths of the sequences packed into one row -> (1, 1, 1, S + 1) int32 bounds [0, l0, l0 + l1, ...].

    Passed as the attention mask of that row's forward: HF hands a 4-D mask to the attention unchanged, and int32
    (never a mask's dtype) tells `packed_causal_attention` that the row holds these sequences."""
    bounds = F.pad(lengths.to(torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    return bounds.view(1, 1, 1, -1)


def _is_sequence_bounds(mask) -> bool:
    return isinstance(mask, torch.Tensor) and mask.dtype == torch.int32 and mask.ndim == 4


def _flash_dtype(query: torch.Tensor):
    """The half dtype flash would run this query in (autocast's, as SDPA under autocast does), else None."""
    if not query.is_cuda:
        return None
    if query.dtype in (torch.float16, torch.bfloat16):
        return query.dtype
    if torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in (torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype("cuda")
    return None


def varlen_causal_attention(query, key, value, bounds: torch.Tensor, longest: int, dropout: float = 0.0,
                            scaling=None, sliding_window: int | None = None) -> torch.Tensor:
    """query (1, Nq, T, D), key/value (1, Nkv, T, D), T tokens of sequences bounded by `bounds` (int32, S + 1)
    -> (1, T, Nq, D): causal attention within each sequence (and, as HF's sliding layers, to the last
    `sliding_window` keys). On CUDA in half precision, flash's variable-length kernel (the one
    `torch.nn.attention.varlen` wraps; differentiable, GQA native); elsewhere SDPA with a block-diagonal causal
    mask (exact, but quadratic in T: for tests and odd devices)."""
    half = _flash_dtype(query)
    if half is not None:
        q, k, v = (t[0].transpose(0, 1).to(half) for t in (query, key, value))  # (T, heads, D)
        window = {} if sliding_window is None else {"window_size_left": sliding_window - 1, "window_size_right": 0}
        out = torch.ops.aten._flash_attention_forward(q, k, v, bounds, bounds, longest, longest, dropout, True,
                                                      False, scale=scaling, **window)[0]
        return out[None]
    tokens = torch.arange(query.shape[2], device=query.device)
    sequence = torch.searchsorted(bounds[1:], tokens, right=True)
    back = tokens[:, None] - tokens[None, :]  # query minus key position
    visible = (sequence[:, None] == sequence[None, :]) & (back >= 0)
    if sliding_window is not None:
        visible &= back < sliding_window
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=visible, dropout_p=dropout, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)


def _along_sequence(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, D) with its L rows reordered by index (B, L)."""
    return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def packed_causal_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                            **kwargs):
    """HF attention interface: query (B, Nq, L, D), key/value (B, Nkv, L, D) -> ((B, L, Nq, D), None)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if _is_sequence_bounds(attention_mask):
        longest = kwargs.get("max_length_q") or query.shape[2]
        return varlen_causal_attention(query, key, value, attention_mask.view(-1), longest, dropout, scaling,
                                       kwargs.get("sliding_window")), None
    if not _is_packing_order(attention_mask):
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, **kwargs)
    order, inverse = attention_mask[0], attention_mask[1, :, :query.shape[2]]
    out = F.scaled_dot_product_attention(
        _along_sequence(query, order), _along_sequence(key, order), _along_sequence(value, order),
        dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return _along_sequence(out, inverse).transpose(1, 2).contiguous(), None


def use_packed_causal_attention(model) -> bool:
    """Switch an HF causal LM (or a peft wrapper of one) on SDPA to this attention; True if it was switched.
    Models on another implementation (eager, flash-attn, flex) are left as they are."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from grpo_gsm8k.modeling import unwrap_causal_lm

    causal_lm = unwrap_causal_lm(model)
    if causal_lm.config._attn_implementation not in ("sdpa", NAME):
        return False
    AttentionInterface.register(NAME, packed_causal_attention)
    AttentionMaskInterface.register(NAME, packed_causal_mask)
    causal_lm.set_attn_implementation(NAME)
    return True
