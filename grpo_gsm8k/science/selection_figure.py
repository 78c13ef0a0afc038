"""The select stage's figure: the validation curve and the training reward, with each candidate step marked.

Plain numbers in, one PNG out, no metadata (same inputs, same bytes), as grpo_gsm8k/science/figures.py.
"""
from __future__ import annotations

from pathlib import Path

from grpo_gsm8k.science.figures import COLORS, _figure
from grpo_gsm8k.science.selection import adapter_points, moving_average

MARK_STYLES = {"chosen": "-", "other": ":"}


def plot_selection(path: Path, validation: list[tuple[int, float]], reward: list[tuple[int, float]],
                   marks: dict[str, int | None], chosen: str, windows: dict[str, int]) -> None:
    """Left: validation accuracy (raw and smoothed); right: mean training reward (raw and smoothed). A vertical
    line at each candidate step (`marks`: label -> step), solid for the one `chosen` names."""
    panels = [("validation accuracy (held-out train questions)", validation, windows["validation"]),
              ("mean training reward", reward, windows["reward"])]
    with _figure(path, ncols=2, width=11.0, height=4.2) as (fig, axes):
        for ax, (title, curve, window) in zip(axes, panels):
            if curve:
                steps, values = zip(*sorted(curve))
                ax.plot(steps, values, color=COLORS["base"], alpha=0.45, marker="o", markersize=3, label="logged")
                # The rule's average leaves out the base model's step-0 point (science/selection.py).
                smoothed = adapter_points(curve) if "validation" in title else sorted(curve)
                if smoothed:
                    ax.plot([step for step, _ in smoothed], moving_average([v for _, v in smoothed], window),
                            color=COLORS["tuned"], label=f"{window}-point moving average")
            else:
                ax.text(0.5, 0.5, "not logged\n(data.validation_questions: 0)" if "validation" in title
                        else "not logged", ha="center", va="center", transform=ax.transAxes)
            for label, step in marks.items():
                if step is not None:
                    ax.axvline(step, color="black", linestyle=MARK_STYLES["chosen" if label == chosen else "other"],
                               linewidth=1.2)
                    ax.annotate(f"{label}: {step}", (step, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                                va="top", ha="right", fontsize=8)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("training step")
            if curve:
                ax.legend(fontsize=8, loc="lower right")
        fig.suptitle(f"Checkpoint selection (solid line: the evaluated step, {chosen})")
