"""Did the GRPO run get a learning signal? Run-level numbers from the logged curves, and a warning when it did not.

GRPO learns only from groups whose completions got different rewards (the advantage is the reward minus its group's
mean). TRL 1.16 already logs per step the share of groups without spread (`frac_reward_zero_std`), the share of
completions cut at max_completion_length (`completions/clipped_ratio`), `completions/mean_length` and each reward's
`rewards/<name>/mean|std`; training_log.LiveLogger writes them all to dvclive. This module adds what TRL lacks,
how far the adapter moved: the norm of the LoRA weight update, ||scaling * B @ A||_F summed over layers (peft
starts B at 0, so this is the distance from initialisation), logged by `UpdateNormLogger` at every logged step.
The train stage puts `signal_summary` in its summary and prints `no_signal_warning`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from transformers import TrainerCallback

UPDATE_NORM = "lora/update_norm"
MEANS = {"zero_std_share": "frac_reward_zero_std", "clipped_share": "completions/clipped_ratio",
         "mean_completion_length": "completions/mean_length"}  # summary key -> TRL's logged name
MAX_ZERO_STD_SHARE = 0.9  # above it, too few groups carry an advantage to learn from
MIN_UPDATE_NORM = 1e-8  # Adam moves nothing when every advantage is 0 (beta 0): the norm stays exactly 0

Curves = dict[str, list[tuple[int, float]]]


def read_curves(live_dir: Path) -> Curves:
    """Every dvclive metric under live_dir, by its logged name ("rewards/format_reward/mean" for nested ones)."""
    from grpo_gsm8k.training_log import read_metric

    root = Path(live_dir) / "plots" / "metrics"
    names = sorted(tsv.relative_to(root).with_suffix("").as_posix() for tsv in root.rglob("*.tsv"))
    return {name: read_metric(live_dir, name) for name in names}


def _mean(points: list[tuple[int, float]] | None) -> float | None:
    return sum(value for _, value in points) / len(points) if points else None


def signal_summary(curves: Curves) -> dict:
    """Means over the logged steps (each step weighted alike), the last update norm, and each reward component's
    mean and spread (`rewards/<name>/mean|std`); None where nothing was logged."""
    summary = {key: _mean(curves.get(name)) for key, name in MEANS.items()}
    norms = curves.get(UPDATE_NORM)
    summary["lora_update_norm"] = norms[-1][1] if norms else None
    components = sorted({name.split("/")[1] for name in curves if name.startswith("rewards/")})
    summary["rewards"] = {name: {stat: _mean(curves.get(f"rewards/{name}/{stat}")) for stat in ("mean", "std")}
                          for name in components}
    return summary


def no_signal_warning(summary: dict) -> str:
    """One warning line when the run had (almost) no learning signal, else ""."""
    share, norm = summary.get("zero_std_share"), summary.get("lora_update_norm")
    flat = share is not None and share > MAX_ZERO_STD_SHARE
    still = norm is not None and norm < MIN_UPDATE_NORM
    if not (flat or still):
        return ""
    share_text = "?" if share is None else f"{share:.0%}"
    norm_text = "?" if norm is None else f"{norm:.3g}"
    return (f"train: WARNING: no learning signal: {share_text} of groups had identical rewards "
            f"(frac_reward_zero_std) and the LoRA update norm is {norm_text}, so the adapter barely changed; "
            "give the groups reward spread (longer max_completion_length than reward.min_tokens, more "
            "num_generations, a prompt the model follows; see presets/cpu.yaml)")


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
