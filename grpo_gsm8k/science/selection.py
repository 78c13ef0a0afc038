"""Which checkpoint to evaluate: the automatic rules, and the validation pass's numbers.

Two rules, both computed by the select stage and shown in the report beside the study's hand-picked step:
- reward rule: the last saved checkpoint at or before the peak of the smoothed mean training reward (what the
  study could have used; training reward is measured on the prompts being trained on);
- validation rule: the saved, validated step with the best smoothed validation accuracy, ties to the earlier step
  (held-out train questions the run never trains on; `select.rule: validation` uses it).
The train stage applies the validation rule as it goes, so the checkpoint it points to is never pruned.
"""
from __future__ import annotations

from grpo_gsm8k.science.analysis import full_format

VALIDATION_PREFIX = "validation/"  # the logged names: validation/accuracy, validation/full_format_rate, ...
VALIDATION_ACCURACY = f"{VALIDATION_PREFIX}accuracy"


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean of up to `window` points, so each value only uses the past."""
    return [sum(values[max(0, i + 1 - window):i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def reward_peak_step(curve: list[tuple[int, float]], saved_steps: list[int], window: int) -> int | None:
    """Last saved step at or before the smoothed reward's peak (the earliest peak on ties)."""
    if not curve or not saved_steps:
        return None
    smoothed = moving_average([value for _, value in curve], window)
    peak_step = curve[max(range(len(smoothed)), key=lambda i: (smoothed[i], -i))][0]
    eligible = [step for step in saved_steps if step <= peak_step]
    return max(eligible) if eligible else min(saved_steps)


def best_validation_step(curve: list[tuple[int, float]], saved_steps, window: int) -> int | None:
    """The saved step whose trailing `window`-point mean validation accuracy is highest, the earlier on ties.

    Step 0 (the base model, validated before training) is the curve's reference, neither a candidate (it has no
    adapter) nor part of any average (it would lend the base model's accuracy to the first checkpoints)."""
    saved = set(saved_steps)
    points = adapter_points(curve)
    smoothed = moving_average([value for _, value in points], window)
    candidates = [(smoothed[i], -step, step) for i, (step, _) in enumerate(points) if step in saved]
    return max(candidates)[2] if candidates else None


def adapter_points(curve: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The validation points of trained adapters (after step 0), by step."""
    return sorted(point for point in curve if point[0] > 0)


def validation_metrics(records: list[dict]) -> dict[str, float]:
    """What one validation pass logs: records carry completion, correct, n_tokens and reward."""
    total = len(records)
    return {f"{VALIDATION_PREFIX}{name}": value for name, value in {
        "accuracy": sum(r["correct"] for r in records) / total,
        "full_format_rate": sum(full_format(r) for r in records) / total,
        "mean_reward": sum(r["reward"] for r in records) / total,
        "mean_tokens": sum(r["n_tokens"] for r in records) / total,
    }.items()}


def value_at(curve: list[tuple[int, float]], step: int | None) -> float | None:
    """The curve's value logged at `step`, or None where it has none."""
    return next((value for at, value in curve if at == step), None)
