"""grpo_gsm8k.training.trimmed_logps on CPU: the real-first order as a table, and a tiny LoRA Llama in a real
GRPOTrainer whose per-token log-probs, entropies and LoRA gradients on a left- and right-padded batch are TRL's own,
with each chunk run at its longest row's width; a row with a gap takes TRL's function."""
from __future__ import annotations

import pytest
import torch

from grpo_gsm8k.training.packed_attention import use_packed_causal_attention
from grpo_gsm8k.training.trimmed_logps import real_first, trim_padding
from tests.test_fastgen import _trainer, make_rollout_func, tiny_model, tiny_tokenizer, with_lora


@pytest.mark.parametrize("mask, first, longest, contiguous", [
    ([[1, 1, 1]], [[0, 1, 2]], 3, True),  # no padding
    ([[0, 0, 1, 1], [1, 1, 1, 0]], [[2, 3], [0, 1, 2]], 3, True),  # left pads (prompt), right pads (completion)
    ([[0, 1, 1, 0, 0]], [[1, 2]], 2, True),  # both, as a GRPO row
    ([[1, 0, 1, 0]], [[0, 2]], 2, False),  # a gap: not one span
    ([[0, 0, 0]], [[]], 0, True),  # nothing real
])
def test_real_first_orders_each_row_and_measures_the_longest(mask, first, longest, contiguous):
    order, width, one_span = real_first(torch.tensor(mask))
    assert [row[:len(f)] for row, f in zip(order.tolist(), first)] == first
    assert (width, one_span) == (longest, contiguous)


def padded_grpo_batch(vocab: int):
    """8 rows: prompts left-padded to 6 tokens, completions right-padded to 5, as TRL lays them out."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (8, 11), generator=generator)
    mask = torch.ones_like(ids)
    for row, (prompt, completion) in enumerate([(6, 5), (3, 2), (4, 5), (2, 1), (5, 3), (6, 1), (3, 4), (2, 2)]):
        mask[row, :6 - prompt] = 0
        mask[row, 6 + completion:] = 0
    return ids, mask


@pytest.fixture
def trainer(monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    tokenizer = tiny_tokenizer()
    model = with_lora(tiny_model(vocab_size=len(tokenizer), eos=tokenizer.eos_token_id)).train()
    return _trainer(model, tokenizer, make_rollout_func(), [])


def logps_entropies_grads(trainer, ids, mask):
    trainer.model.zero_grad()
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 5, batch_size=4,
                                                                     compute_entropy=True)
    (logps * mask[:, -5:]).sum().backward()
    grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
    return logps.detach(), entropies.detach(), grads


def spy_widths(trainer, positions: list | None = None) -> list[int]:
    widths = []
    forward = trainer.model.forward

    def spy(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[1] if kwargs["input_ids"].shape[0] > 1 else kwargs["input_ids"].shape)
        if positions is not None:
            positions.append(kwargs.get("position_ids"))
        return forward(*args, **kwargs)

    trainer.model.forward = spy
    return widths


def test_trimmed_chunks_give_trls_log_probs_entropies_and_gradients(trainer):
    ids, mask = padded_grpo_batch(len(trainer.processing_class))
    want = logps_entropies_grads(trainer, ids, mask)
    trim_padding(trainer)
    positions = []
    widths = spy_widths(trainer, positions)
    got = logps_entropies_grads(trainer, ids, mask)
    # every token keeps TRL's position, its column (HF's default arange, pads counted): row 1's 5 real tokens
    # (columns 3-7) first, then its pads
    assert positions[0][1].tolist() == [3, 4, 5, 6, 7, 0, 1, 2, 8, 9, 10]
    assert widths == [11, 8]  # each chunk of 4 at its longest row (rows 0-3: 11; rows 4-7: 5 + 3), not at 11
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    assert (got[0][mask[:, -5:] == 0] == 0).all()  # completion pads stay 0, as TRL leaves them
    assert len(got[2]) == len(want[2]) > 0
    for ours, trl in zip(got[2], want[2]):
        torch.testing.assert_close(ours, trl, rtol=1e-5, atol=1e-6)


def test_a_row_with_a_gap_takes_trls_own_function(trainer):
    ids, mask = padded_grpo_batch(len(trainer.processing_class))
    mask[4, 7] = 0  # a hole inside row 4's real tokens: the second chunk cannot be trimmed exactly
    want = logps_entropies_grads(trainer, ids, mask)
    trim_padding(trainer)
    widths = spy_widths(trainer)
    got = logps_entropies_grads(trainer, ids, mask)
    assert widths == [11, 11]
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)


def test_packed_rows_give_trls_log_probs_entropies_and_gradients(trainer):
    """Each chunk's rows packed into one sequence (attention per row on CPU through the block-diagonal mask; the
    flash kernel is tests/gpu's)."""
    ids, mask = padded_grpo_batch(len(trainer.processing_class))
    want = logps_entropies_grads(trainer, ids, mask)
    assert use_packed_causal_attention(trainer.model)
    trim_padding(trainer, pack_rows=True)
    positions = []
    widths = spy_widths(trainer, positions)
    got = logps_entropies_grads(trainer, ids, mask)
    # rows 0-3 hold 11 + 5 + 9 + 3 = 28 real tokens, rows 4-7 8 + 7 + 7 + 4 = 26: one row each, rounded up to 32
    assert widths == [(1, 32), (1, 32)]
    # row 0's tokens at their columns 0-10, then row 1's at its columns 3-7 (TRL's positions, pads counted)
    assert positions[0][0, :16].tolist() == list(range(11)) + [3, 4, 5, 6, 7]
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    assert (got[0][mask[:, -5:] == 0] == 0).all()
    assert len(got[2]) == len(want[2]) > 0
    for ours, trl in zip(got[2], want[2]):  # fp32 sums over other GEMM shapes: compared as a whole, not per element
        assert (ours - trl).norm() <= 1e-5 * trl.norm()
