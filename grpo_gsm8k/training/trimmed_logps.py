"""TRL's per-token log-probs with each chunk's padding cut away before the model runs.

TRL 1.16 scores a GRPO batch as it was padded: every prompt left-padded to the longest prompt of the generation
batch, every completion right-padded to the longest completion, so a training forward of 6 rows runs all of them at
the longest of 24. Each pad position costs the same GEMM work as a real token. `trim_padding(trainer)` makes
`_get_per_token_logps_and_entropies` move each row's real tokens, in order, to the front (positions kept through
`position_ids`), cut the chunk to its longest row, run TRL's fused LM head there and put the log-probs (and
entropies) back where TRL's own layout has them (`.`: a pad, masked):

    TRL's layout, width 8       trimmed to the chunk's longest row, width 7
    [. . a b c d . .]           [a b c d . . .]
    [e f g h i j k .]           [e f g h i j k]

The same tokens at the same positions attend the same tokens (causal, pads masked), and each label is scored from
the hidden state of the token before it, as in TRL's layout; positions TRL leaves at 0 stay 0. Rows whose real
tokens are not one contiguous span (never in GRPO), vision inputs and MoE aux losses take TRL's own function.
At realistic lengths on an H200 the training half ran at 27% of peak counting real tokens (bench/RESULTS.md,
2026-12-02); counting the pads it computed too (1.85x the real tokens, bench/padding_tokens.py), about 50%, as at
the worst case's full rows: the difference was padding. Trimming cuts 22% of the training forwards' tokens and 5%
of the reference forward's (all 24 rows at once). `trim_padding(trainer, pack_rows=True)` goes on to the real
tokens alone (54% of TRL's training-forward tokens there): `packed_chunk` puts a chunk's rows one after another in
a single sequence, and attention runs per row on flash's variable-length kernel (training/packed_attention.py;
CUDA in half precision, so the train stage packs there and trims elsewhere; `speedups.will_pack_rows`).
"""
from __future__ import annotations

import torch

from grpo_gsm8k.training.packed_attention import real_tokens_first, sequence_bounds

_OWN_PATH_ONLY = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                  "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def real_spans(real: torch.Tensor) -> tuple[int, bool]:
    """(B, L) bool, True at real tokens -> (the longest row's real-token count; whether every row's real tokens form
    one contiguous span). One host sync."""
    starts = (real[:, 1:] & ~real[:, :-1]).sum(1) + real[:, 0]  # spans of real tokens per row
    longest, spans = torch.stack([real.sum(1).max(), starts.max()]).tolist()
    return longest, spans <= 1


def real_first(attention_mask: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """(B, L) 0/1 mask -> (order (B, L): each row's real tokens first, in order, then its pads; `real_spans`)."""
    return real_tokens_first(attention_mask), *real_spans(attention_mask != 0)


def trl_labels_and_positions(input_ids, attention_mask, logits_to_keep: int):
    """TRL's layout: the labels its loss scores (completion tokens; -100 elsewhere), and each column's position."""
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-logits_to_keep] = -100
    positions = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)
    return labels, positions


def trimmed_chunk(model, input_ids, attention_mask, logits_to_keep: int, compute_entropy: bool, autocast):
    """TRL's scoring of one chunk on its trimmed layout; None when the layout cannot be trimmed exactly."""
    order, width, contiguous = real_first(attention_mask)
    if not contiguous:
        return None
    labels, positions = trl_labels_and_positions(input_ids, attention_mask, logits_to_keep)
    keep = order[:, :width]  # (B, W): original column of each trimmed position
    with autocast():
        outputs = model(input_ids=input_ids.gather(1, keep), attention_mask=attention_mask.gather(1, keep),
                        position_ids=positions.gather(1, keep), labels=labels.gather(1, keep), fused_lm_head=True)

    def to_trl_layout(per_token: torch.Tensor) -> torch.Tensor:
        # per_token[:, j] scores the token at trimmed position j + 1; TRL's [:, t - 1] scores the token at column t
        by_column = per_token.new_zeros(input_ids.shape).scatter(1, keep[:, 1:], per_token)
        return by_column[:, 1:][:, -logits_to_keep:]

    entropy = to_trl_layout(outputs.entropy) if compute_entropy else None
    return to_trl_layout(outputs.log_probs), entropy


def packed_chunk(model, input_ids, attention_mask, logits_to_keep: int, compute_entropy: bool, autocast):
    """TRL's scoring of one chunk with its rows' real tokens packed, in order, into one sequence (no pads at all;
    attention per row through `sequence_bounds`); None when a row's real tokens are not one span.

        TRL's layout               packed into one row, its length rounded up to a multiple of 8
        [. . a b c d . .]          [a b c d e f g h i j k | z z z z z]
        [e f g h i j k .]           row 0   row 1           filler, its own sequence

    The filler keeps the length a multiple of 8, as `packing_order` does against Inductor's guard on the
    attention inputs' alignment, and is never scored. Each row's first token is a prompt
    token, unscored as in TRL's layout, so no label crosses from one row into the next."""
    real = attention_mask != 0
    longest, contiguous = real_spans(real)
    if not contiguous:
        return None
    rows, columns = real.nonzero(as_tuple=True)  # row-major: each row's real tokens, in order
    total = rows.numel()
    filler = 8 * (total // 8 + 1) - total
    bounds = sequence_bounds(torch.cat([real.sum(1), rows.new_tensor([filler])]))

    def packed(per_column: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.cat([per_column[rows, columns], per_column.new_full((filler,), fill)])[None]

    labels, positions = trl_labels_and_positions(input_ids, attention_mask, logits_to_keep)
    with autocast():
        outputs = model(input_ids=packed(input_ids, 0), attention_mask=bounds,
                        position_ids=packed(positions, 0), labels=packed(labels, -100), fused_lm_head=True,
                        max_length_q=longest, max_length_k=longest)

    def to_trl_layout(per_token: torch.Tensor) -> torch.Tensor:
        # per_token[0, p - 1] scores packed token p, which sits at (rows[p], columns[p]) in TRL's layout
        by_column = per_token.new_zeros(input_ids.shape).index_put((rows[1:], columns[1:]), per_token[0, :total - 1])
        return by_column[:, 1:][:, -logits_to_keep:]

    entropy = to_trl_layout(outputs.entropy) if compute_entropy else None
    return to_trl_layout(outputs.log_probs), entropy


def trim_padding(trainer, *, pack_rows: bool = False) -> None:
    """Route the trainer's per-token log-prob forwards (training, reference, old) through `trimmed_chunk`, or with
    `pack_rows` through `packed_chunk` (for models on `packed_causal_attention`: its variable-length kernel is
    CUDA's flash; elsewhere it masks a (tokens x tokens) square, correct but slower than trimming)."""
    chunk_forward = packed_chunk if pack_rows else trimmed_chunk
    original = trainer._get_per_token_logps_and_entropies

    def trimmed(model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
                compute_aux_loss=False, **kwargs):
        if compute_aux_loss or any(kwargs.get(name) is not None for name in _OWN_PATH_ONLY):
            return original(model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                            compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **kwargs)
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            chunk = chunk_forward(model, input_ids[rows], attention_mask[rows], logits_to_keep, compute_entropy,
                                  trainer.accelerator.autocast)
            if chunk is None:
                chunk = original(model, input_ids[rows], attention_mask[rows], logits_to_keep,
                                 compute_entropy=compute_entropy)[:2]
            logps.append(chunk[0])
            entropies.append(chunk[1])
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    trainer._get_per_token_logps_and_entropies = trimmed
