"""Token sampling for `grpo_gsm8k.fastgen.generator`: temperature, nucleus (top-p), and the log-probs TRL compares with.

Sampling is an exponential race, argmax(log p - log E) with E ~ Exp(1) drawn from the device's default generator:
one elementwise draw and one argmax, no host sync, so it can sit inside a captured CUDA graph. The reported
log-prob of a sampled token is under the temperature-scaled distribution *before* top-p truncation: that is what
TRL's training forward computes (`log_softmax(logits / temperature)`), so the two are directly comparable.
"""
from __future__ import annotations

import torch

# Exp(1) draws are clamped away from 0 so -log(E) stays finite: a banned token (-inf) can never win through inf-inf.
_MIN_EXP = 1e-30


def nucleus_logp(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """logp (B, V) with every token outside the top-p nucleus set to -inf (the most likely token always stays)."""
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    probs = sorted_logp.exp()
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logp.masked_fill(drop, float("-inf"))


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                  vocab_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V) fp32 -> (token ids (B,), their log-probs (B,) fp32). temperature 0 means greedy."""
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits.clone()
        logits[:, vocab_size:] = float("-inf")  # ids the tokenizer cannot decode (padded lm_head)
    if temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)
        tokens = logp.argmax(dim=-1)
    else:
        logp = torch.log_softmax(logits / temperature, dim=-1)
        candidates = nucleus_logp(logp, top_p) if top_p < 1.0 else logp
        noise = torch.empty_like(candidates).exponential_().clamp_(min=_MIN_EXP).log_()
        tokens = (candidates - noise).argmax(dim=-1)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]
