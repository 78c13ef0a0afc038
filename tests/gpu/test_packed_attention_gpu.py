"""GPU check of grpo_gsm8k.training.packed_attention in bf16 (`pytest -m gpu tests/gpu`): at the 8B model's head
layout (32 query heads, 8 KV heads, head_dim 128) and a GRPO-like padded batch, the packed attention runs on SDPA's
flash kernel alone (forward and backward), and its real positions and input gradients match an fp32 masked
reference as closely as HF's masked SDPA in bf16 does; rows packed into one sequence run on flash's variable-length
kernel and match an fp32 per-sequence reference (tests/test_packed_attention.py checks the model-level
equality on CPU)."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from grpo_gsm8k.training import packed_attention
from grpo_gsm8k.training.packed_attention import packed_causal_attention, packing_order, sequence_bounds

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


class _Module:  # what HF's attention functions read from the attention module
    is_causal = True
    training = True


def grpo_like_mask(rows: int = 6, length: int = 400) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(rows, length, dtype=torch.long)
    for r in range(rows):
        left = int(torch.randint(0, 60, (1,), generator=generator))  # prompt padding
        right = int(torch.randint(0, 200, (1,), generator=generator))  # completion padding
        mask[r, left:length - right] = 1
    return mask.cuda()


def masked_reference(q, k, v, mask):
    """fp32 SDPA over causal & real-key, with HF's GQA layout: (B, L, Nq, D)."""
    q, k, v = (t.float() for t in (q, k, v))
    length = q.shape[2]
    visible = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()[None] & mask.bool()[:, None, :]
    visible = visible | torch.eye(length, dtype=torch.bool, device=q.device)  # no empty row for pad queries
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None], enable_gqa=True)
    return out.transpose(1, 2)


def test_packed_attention_runs_on_flash_and_matches_the_masked_reference():
    torch.manual_seed(0)
    mask = grpo_like_mask()
    b, length = mask.shape
    q = torch.randn(b, 32, length, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, 8, length, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, 8, length, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn(b, length, 32, 128, device="cuda", dtype=torch.bfloat16)
    real = mask.bool()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if the call is not flash-eligible
        out, _ = packed_causal_attention(_Module(), q, k, v, packing_order(mask), scaling=128 ** -0.5)
        (out.float() * upstream * real[..., None, None]).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = masked_reference(q, k, v, mask)
    (ref * upstream.float() * real[..., None, None]).sum().backward()
    rel = lambda a, r: ((a.float() - r.float()).norm() / r.float().norm()).item()  # noqa: E731
    out_err = rel(out[real], ref[real])
    grad_errs = [rel(g, t.grad) for g, t in zip(grads, (q, k, v))]
    print(f"packed flash vs fp32 masked: output {out_err:.2e}, grads q/k/v {[f'{e:.2e}' for e in grad_errs]}")
    assert out_err <= 1e-2 and max(grad_errs) <= 1e-2


@pytest.mark.parametrize("sliding_window", [None, 64])
def test_packed_rows_run_on_flash_varlen_and_match_each_sequence_alone(monkeypatch, sliding_window):
    """Six GRPO-like rows (prompt + completion lengths) packed into one sequence at the 8B head layout, under
    autocast as in training: forward and backward against fp32 causal SDPA run on each row alone (and a sliding
    layer's window, as HF's)."""
    torch.manual_seed(0)
    lengths = [412, 97, 230, 388, 151, 305, 5]  # the last: filler up to a multiple of 8, its own sequence
    total = sum(lengths)
    q = torch.randn(1, 32, total, 128, device="cuda", requires_grad=True)  # fp32 leaves, bf16 under autocast
    k = torch.randn(1, 8, total, 128, device="cuda", requires_grad=True)
    v = torch.randn(1, 8, total, 128, device="cuda", requires_grad=True)
    upstream = torch.randn(1, total, 32, 128, device="cuda")

    def no_masked_fallback(*args, **kwargs):
        raise AssertionError("the block-diagonal SDPA fallback ran instead of flash's variable-length kernel")

    monkeypatch.setattr(packed_attention.F, "scaled_dot_product_attention", no_masked_fallback)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = packed_causal_attention(_Module(), q, k, v, sequence_bounds(torch.tensor(lengths, device="cuda")),
                                         scaling=128 ** -0.5, max_length_q=max(lengths), sliding_window=sliding_window)
    assert out.dtype == torch.bfloat16 and out.shape == (1, total, 32, 128)
    (out.float() * upstream).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    monkeypatch.undo()
    pieces, start = [], 0
    for length in lengths:
        rows = slice(start, start + length)
        back = torch.arange(length, device="cuda")[:, None] - torch.arange(length, device="cuda")[None, :]
        visible = (back >= 0) & (back < (sliding_window or length))
        pieces.append(torch.nn.functional.scaled_dot_product_attention(
            q[:, :, rows], k[:, :, rows], v[:, :, rows], attn_mask=visible, scale=128 ** -0.5, enable_gqa=True))
        start += length
    ref = torch.cat(pieces, dim=2).transpose(1, 2)
    for t in (q, k, v):
        t.grad = None
    (ref * upstream).sum().backward()
    rel = lambda a, r: ((a.float() - r.float()).norm() / r.float().norm()).item()  # noqa: E731
    out_err = rel(out, ref)
    grad_errs = [rel(g, t.grad) for g, t in zip(grads, (q, k, v))]
    print(f"packed rows (window {sliding_window}), flash varlen vs fp32 per row: output {out_err:.2e}, grads q/k/v "
          f"{[f'{e:.2e}' for e in grad_errs]}")
    assert out_err <= 1e-2 and max(grad_errs) <= 1e-2
