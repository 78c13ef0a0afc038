"""How far the adapter moved: the norm of the LoRA weight update, ||scaling * B @ A||_F summed over layers (peft
starts B at 0, so this is the distance from initialisation), added to the logs by `UpdateNormLogger` at every
logged step. What the numbers mean for a run is science/learning_signal.py.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

from transformers import TrainerCallback

from grpo_gsm8k.science.learning_signal import UPDATE_NORM


def lora_update_norm(layers: Iterable[tuple]) -> float:
    """sqrt(sum ||scale * B @ A||_F^2) over (A (r, in), B (out, r), scale) triples, via r x r products:
    ||B A||_F^2 = sum((B^T B) * (A A^T)), so the (out, in) update is never built (cheap for an 8B model)."""
    total = 0.0
    for a, b, scale in layers:
        a, b = a.detach().float(), b.detach().float()
        total += scale ** 2 * float(((b.T @ b) * (a @ a.T)).sum())
    return math.sqrt(max(total, 0.0))  # rounding can leave a tiny negative for a zero update


def lora_layers(model) -> list[tuple]:
    """(A, B, scale) of every active adapter of every peft LoRA layer in the model."""
    layers = []
    for module in model.modules():
        lora_a, lora_b, scaling = (getattr(module, name, None) for name in ("lora_A", "lora_B", "scaling"))
        if lora_a is None or lora_b is None or not isinstance(scaling, dict):
            continue
        for adapter in lora_a:
            if adapter in lora_b and adapter in scaling:
                layers.append((lora_a[adapter].weight, lora_b[adapter].weight, scaling[adapter]))
    return layers


class UpdateNormLogger(TrainerCallback):
    """Adds UPDATE_NORM to each step's logs, and to the log_history entry Trainer.log has just appended (a resume
    rebuilds the curves from it). It must come before LiveLogger: the Trainer hands every callback the same logs
    dict, in order."""

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or model is None:
            return
        logs[UPDATE_NORM] = lora_update_norm(lora_layers(model))
        if state is not None and state.log_history:
            state.log_history[-1][UPDATE_NORM] = logs[UPDATE_NORM]
