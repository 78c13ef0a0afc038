"""grpo_gsm8k.training.packed_attention on CPU: the packing order and the sequence bounds as tables, attention
over packed sequences against SDPA on each alone, and a tiny LoRA Llama whose logits (real positions) and LoRA
gradients on a padded batch equal HF's masked SDPA's; HF generate, eager models and the plain-causal dispatch (no
mask reaches SDPA) as well. tests/gpu/test_packed_attention_gpu.py checks that CUDA runs both on flash kernels."""
from __future__ import annotations

import copy

import pytest
import torch

from grpo_gsm8k.training import packed_attention
from grpo_gsm8k.training.packed_attention import (packing_order, sequence_bounds, use_packed_causal_attention,
                                                  varlen_causal_attention)
from tests.test_fastgen import tiny_model, with_lora


@pytest.mark.parametrize("mask, order", [
    ([1, 1, 1, 1], [0, 1, 2, 3]),  # no padding: nothing moves
    ([0, 0, 1, 1, 1], [2, 3, 4, 0, 1]),  # left pads (a prompt) go behind the real tokens
    ([1, 1, 0], [0, 1, 2]),  # right pads (a short completion) already are
    ([0, 1, 1, 0, 0], [1, 2, 0, 3, 4]),  # both: real tokens first, pads after in their own order
    ([1, 0, 1, 1, 0], [0, 2, 3, 1, 4]),  # a gap: the real tokens still keep their order
    ([0, 0, 0], [0, 1, 2]),  # all padding
])
def test_packing_order_puts_real_tokens_first_in_order_and_inverts(mask, order):
    both = packing_order(torch.tensor([mask]))
    assert both[0, 0, :len(mask)].tolist() == order
    inverse = both[1, 0, :len(mask)]
    assert torch.equal(torch.arange(len(mask))[order][inverse], torch.arange(len(mask)))  # [1] undoes [0]
    # padded to the next multiple of 8 above the length (one compiled variant for all lengths), with column 0
    assert both.shape[2] % 8 == 0 and both.shape[2] > len(mask) and (both[:, 0, len(mask):] == 0).all()


@pytest.mark.parametrize("lengths, bounds", [
    ([5], [0, 5]),
    ([3, 1, 4], [0, 3, 4, 8]),
    ([2, 0, 6], [0, 2, 2, 8]),  # an empty sequence: two equal bounds
])
def test_sequence_bounds_are_int32_cumulative_lengths_in_a_4d_mask(lengths, bounds):
    got = sequence_bounds(torch.tensor(lengths))
    assert got.dtype == torch.int32 and got.shape == (1, 1, 1, len(lengths) + 1)
    assert got.view(-1).tolist() == bounds


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_varlen_attention_is_causal_attention_within_each_sequence(sliding_window):
    """The CPU path (block-diagonal causal mask) against causal SDPA run on each sequence alone; a sliding layer
    sees the last `sliding_window` keys, as HF's sliding_window_overlay."""
    torch.manual_seed(0)
    lengths = [3, 5, 1, 7]
    q = torch.randn(1, 4, sum(lengths), 8)
    k, v = torch.randn(2, 1, 2, sum(lengths), 8).unbind(0)  # 2 KV heads for 4 query heads (GQA)
    out = varlen_causal_attention(q, k, v, sequence_bounds(torch.tensor(lengths)).view(-1), max(lengths),
                                  sliding_window=sliding_window)
    start = 0
    for length in lengths:
        piece = slice(start, start + length)
        back = torch.arange(length)[:, None] - torch.arange(length)[None, :]
        visible = (back >= 0) & (back < (sliding_window or length))
        alone = torch.nn.functional.scaled_dot_product_attention(q[:, :, piece], k[:, :, piece], v[:, :, piece],
                                                                 attn_mask=visible, enable_gqa=True)
        torch.testing.assert_close(out[:, piece], alone.transpose(1, 2), rtol=1e-5, atol=1e-6)
        start += length


def padded_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (4, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded prompt
    mask[1, 9:] = 0  # a short completion
    mask[2, :2] = 0
    mask[2, 10:] = 0  # both, as a GRPO row
    return ids, mask


def logits_and_lora_grads(model, ids, mask):
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    logps = logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    (logps * mask).sum().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_real_positions_and_lora_gradients_equal_masked_sdpa(monkeypatch):
    masked = with_lora(tiny_model()).train()
    packed = copy.deepcopy(masked)
    assert use_packed_causal_attention(packed)
    assert packed.base_model.model.config._attn_implementation == packed_attention.NAME
    sdpa_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        sdpa_calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    ids, mask = padded_batch()
    want_logits, want_grads = logits_and_lora_grads(masked, ids, mask)
    monkeypatch.setattr(packed_attention.F, "scaled_dot_product_attention", spy)
    got_logits, got_grads = logits_and_lora_grads(packed, ids, mask)
    assert sdpa_calls and all(m is None and causal for m, causal in sdpa_calls)  # the flash-eligible call
    real = mask.bool()
    torch.testing.assert_close(got_logits[real], want_logits[real], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got_logits).all()  # pad positions: unused, but finite (NaN * 0 would poison gradients)
    assert len(got_grads) == len(want_grads) > 0
    for got, want in zip(got_grads, want_grads):  # fp32 sums in another order: measured against the norm
        assert (got - want).norm() <= 1e-5 * want.norm()


def test_generate_with_a_kv_cache_is_unchanged():
    """Prefill is a full causal forward (packed); the cached decode steps take HF's own mask."""
    masked = with_lora(tiny_model()).eval()
    packed = copy.deepcopy(masked)
    use_packed_causal_attention(packed)
    ids, mask = padded_batch(seed=1)
    ids, mask = ids[[0, 3]], mask[[0, 3]]  # left padding only, as generate expects
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 1}
    assert torch.equal(packed.generate(ids, **kwargs), masked.generate(ids, **kwargs))


def test_models_on_other_attention_are_left_alone():
    eager = tiny_model()
    eager.set_attn_implementation("eager")
    assert not use_packed_causal_attention(eager)
    assert eager.config._attn_implementation == "eager"
