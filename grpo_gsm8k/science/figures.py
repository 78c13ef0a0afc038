"""Seaborn figures for the statistics stage (`python -m stages.stats --help` renders them into one folder).

Each `plot_*` function takes plain numbers, draws one PNG and returns nothing. PNGs carry no software/version
metadata and use no random jitter, so the same inputs give byte-identical files (the pipeline and its tests
rely on that). The headless Agg backend is selected here, before pyplot is imported.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - must follow the backend choice
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from grpo_gsm8k.contracts import FIGURES  # noqa: E402
from grpo_gsm8k.science.analysis import GRADINGS, MODELS, pair_by_question  # noqa: E402

COLORS = {"base": "#4C72B0", "tuned": "#DD8452"}
DPI = 120
# Training panels beyond this many are dropped (listed in the stage's notes) to keep the figure legible.
MAX_TRAINING_PANELS = 8


@contextlib.contextmanager
def _figure(path: Path, ncols: int = 1, width: float = 7.0, height: float = 4.5) -> Iterator:
    """A themed figure whose axes are yielded; it is saved without metadata and closed on exit."""
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook"):
        fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
        try:
            yield fig, list(axes[0])
            fig.tight_layout()
            fig.savefig(path, dpi=DPI, metadata={"Software": None}, format="png")  # also to a .tmp path
        finally:
            plt.close(fig)


def plot_proportions(path: Path, accuracy: dict[str, float], wilson: dict[str, tuple[float, float]],
                     bootstrap: dict[str, tuple[float, float]], n_questions: int, n_answers: dict[str, int],
                     alpha: float = 0.05) -> None:
    """Accuracy per model with its Wilson (answers independent) and cluster-bootstrap (questions) intervals."""
    level = f"{1 - alpha:.0%}"
    with _figure(path) as (fig, (ax,)):
        for x, model in enumerate(accuracy):
            for offset, (low, high), marker, label in ((-0.1, wilson[model], "o", f"Wilson {level}"),
                                                        (0.1, bootstrap[model], "s", f"cluster bootstrap {level}")):
                ax.errorbar(x + offset, accuracy[model], yerr=[[accuracy[model] - low], [high - accuracy[model]]],
                            fmt=marker, color=COLORS.get(model, "grey"), capsize=6, markersize=7,
                            label=label if x == 0 else None, mfc="white" if marker == "s" else None)
            ax.annotate(f"{accuracy[model]:.1%}\n({n_answers[model]} answers)", (x + 0.22, accuracy[model]),
                        va="center", fontsize=10)
        ax.set_xticks(range(len(accuracy)), list(accuracy))
        ax.set_xlim(-0.5, len(accuracy) - 0.2)
        # Zoom in when every interval is low (the CPU demo scores ~2%), else show the full 0-1 scale.
        top = max(high for intervals in (wilson, bootstrap) for _, high in intervals.values())
        upper = 1.03 if top > 0.6 else min(1.03, 1.5 * top + 0.02)
        ax.set_ylim(-0.03 * upper, upper)
        ax.set_xlabel("model")
        ax.set_ylabel("accuracy (fraction of answers correct)")
        ax.set_title(f"GSM8K accuracy per model (n = {n_questions} questions)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, title="interval")


def plot_differences(path: Path, qids: Sequence[int], diffs: Sequence[float], mean: float, ci_low: float,
                     ci_high: float, alpha: float = 0.05) -> None:
    """Per-question change in accuracy (tuned - base), sorted, with the mean and its bootstrap interval."""
    order = np.lexsort((np.asarray(qids), np.asarray(diffs, float)))
    sorted_diffs = np.asarray(diffs, float)[order]
    colors = [COLORS["tuned"] if d > 0 else COLORS["base"] if d < 0 else "lightgrey" for d in sorted_diffs]
    with _figure(path, width=max(7.0, min(14.0, 0.3 * len(order)))) as (fig, (ax,)):
        ax.bar(range(len(order)), sorted_diffs, color=colors, width=0.8)
        ax.axhspan(ci_low, ci_high, color="black", alpha=0.1,
                   label=f"{1 - alpha:.0%} cluster-bootstrap CI [{ci_low:+.2f}, {ci_high:+.2f}]")
        ax.axhline(mean, color="black", lw=1.5, label=f"overall difference {mean:+.3f}")
        ax.axhline(0, color="grey", lw=0.8)
        if len(order) <= 40:  # question labels stay legible up to about 40 bars
            ax.set_xticks(range(len(order)), [f"q{qids[i]}" for i in order], rotation=90, fontsize=8)
        else:
            ax.set_xticks([])
        ax.set_ylim(-1.05, 1.05)
        ax.set_xlabel("question (sorted by difference)")
        ax.set_ylabel("accuracy difference, tuned − base")
        ax.set_title(f"Per-question accuracy change (n = {len(order)} questions)")
        ax.legend(loc="upper left", fontsize=9)


def plot_paired(path: Path, base_scores: Sequence[float], tuned_scores: Sequence[float]) -> None:
    """Each question's base score against its tuned score; bubble area and label = number of questions."""
    pairs = pd.DataFrame({"base": np.round(base_scores, 6), "tuned": np.round(tuned_scores, 6)})
    counts = pairs.value_counts().sort_index().reset_index(name="questions")
    improved = int((pairs.tuned > pairs.base).sum())
    worse = int((pairs.tuned < pairs.base).sum())
    with _figure(path, width=6.0, height=6.0) as (fig, (ax,)):
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="no change")
        colors = [COLORS["tuned"] if t > b else COLORS["base"] if t < b else "grey"
                  for b, t in zip(counts.base, counts.tuned)]
        ax.scatter(counts.base, counts.tuned, s=120 + 600 * counts.questions / counts.questions.max(), c=colors,
                   alpha=0.6, edgecolors="black", linewidths=0.5)
        for row in counts.itertuples():
            ax.annotate(str(row.questions), (row.base, row.tuned), ha="center", va="center", fontsize=9)
        ax.set_xlim(-0.08, 1.08)
        ax.set_ylim(-0.08, 1.08)
        ax.set_aspect("equal")
        ax.set_xlabel("base model: fraction of samples correct")
        ax.set_ylabel("tuned model: fraction of samples correct")
        ax.set_title(f"Paired per-question scores (n = {len(pairs)} questions)\n"
                     f"{improved} improved, {worse} worse, {len(pairs) - improved - worse} unchanged", fontsize=11)
        ax.legend(loc="upper left", fontsize=9)


def plot_lengths(path: Path, frame: pd.DataFrame) -> None:
    """Completion length (tokens) by model and correctness. `frame` has columns model, n_tokens, correct."""
    data = frame.assign(outcome=np.where(frame.correct, "correct", "wrong"))
    models = list(dict.fromkeys(data.model))
    with _figure(path, ncols=2, width=12.0) as (fig, (hist_ax, box_ax)):
        sns.histplot(data, x="n_tokens", hue="model", hue_order=models, element="step", bins=30, ax=hist_ax,
                     palette=COLORS)
        hist_ax.set_xlabel("completion length (tokens)")
        hist_ax.set_ylabel("answers")
        hist_ax.set_title(f"Length distribution (n = {len(data)} answers)")
        with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib 3.11's deprecated `vert`; harmless
            warnings.simplefilter("ignore", matplotlib.MatplotlibDeprecationWarning)
            sns.boxplot(data, x="model", y="n_tokens", hue="outcome", order=models, hue_order=["correct", "wrong"],
                        palette={"correct": "#55A868", "wrong": "#C44E52"}, ax=box_ax)
        labels = [f"{m}\n({int(data[(data.model == m) & data.correct].shape[0])} correct, "
                  f"{int(data[(data.model == m) & ~data.correct].shape[0])} wrong)" for m in models]
        box_ax.set_xticks(range(len(models)), labels)
        box_ax.set_xlabel("model")
        box_ax.set_ylabel("completion length (tokens)")
        box_ax.set_title("Length by correctness")
        sns.move_legend(box_ax, "upper left", bbox_to_anchor=(1.0, 1.0), title="outcome")


def load_training_log(folder: Path | None) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Every `step`-indexed curve under a dvclive folder (`**/*.tsv`, `**/*.csv`), keyed by its relative path.

    Returns (curves, notes); a missing folder or an unreadable file becomes a note, never an error, because
    the training figure is optional.
    """
    if folder is None:
        return {}, ["no training log given: training figure skipped"]
    folder = Path(folder)
    if not folder.is_dir():
        return {}, [f"{folder} is not a folder: training figure skipped"]
    curves, notes = {}, []
    files = sorted(p for pattern in ("**/*.tsv", "**/*.csv") for p in folder.glob(pattern) if p.is_file())
    for file in files:
        name = file.relative_to(folder).with_suffix("").as_posix().removeprefix("plots/metrics/")
        try:
            table = pd.read_csv(file, sep="\t" if file.suffix == ".tsv" else ",")
        except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
            notes.append(f"{file}: unreadable ({type(err).__name__}), skipped")
            continue
        values = [c for c in table.columns if c not in ("step", "timestamp")]
        if "step" not in table.columns or len(values) != 1 or table.empty:
            notes.append(f"{file}: expected columns step and one metric, got {list(table.columns)}; skipped")
            continue
        curve = table[["step", values[0]]].apply(pd.to_numeric, errors="coerce").dropna()
        curves[name] = curve.rename(columns={values[0]: "value"}).sort_values("step", kind="stable")
    if not files:
        notes.append(f"{folder} holds no .tsv/.csv curves: training figure skipped")
    return curves, notes


# The curves a reader of a GRPO run looks at first; the rest stay in `dvc plots show`.
PREFERRED_CURVES = ("loss", "reward", "rewards/correctness_reward/mean", "rewards/format_reward/mean",
                    "completions/mean_length", "completions/clipped_ratio", "kl", "entropy")


def training_panels(names: Sequence[str]) -> list[str]:
    """The preferred curves in that order, then other per-reward means, at most MAX_TRAINING_PANELS."""
    def rank(name: str) -> tuple[int, str]:
        if name in PREFERRED_CURVES:
            return (PREFERRED_CURVES.index(name), name)
        return (len(PREFERRED_CURVES) + (0 if name.startswith("rewards/") and name.endswith("/mean") else 1), name)

    return sorted(names, key=rank)[:MAX_TRAINING_PANELS]


def plot_training(path: Path, curves: dict[str, pd.DataFrame]) -> None:
    """One panel per training curve (value against step)."""
    names = training_panels(list(curves))
    ncols = min(len(names), 4)
    nrows = -(-len(names) // ncols)
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook"):
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols, 3.3 * nrows + 0.6), squeeze=False)
        try:
            for ax, name in zip(axes.ravel(), names):
                curve = curves[name]
                ax.plot(curve.step, curve.value, color=COLORS["tuned"] if "reward" in name else COLORS["base"],
                        marker="o" if len(curve) < 30 else None, markersize=3)
                ax.set_title(name, fontsize=10)
                ax.set_xlabel("training step")
                ax.set_ylabel("value")
            for ax in axes.ravel()[len(names):]:
                ax.set_visible(False)
            steps = max(len(c) for c in curves.values())
            fig.suptitle(f"GRPO training curves (dvclive; n = {steps} logged steps)")
            fig.tight_layout()
            fig.savefig(path, dpi=DPI, metadata={"Software": None}, format="png")  # also to a .tmp path
        finally:
            plt.close(fig)


def signal_panels(curves: dict[str, pd.DataFrame]) -> list[tuple[str, list[str]]]:
    """(title, curve names) of each learning-signal panel that has data, in reading order: the shares of groups
    without reward spread and of truncated completions, each reward component's mean (its std drawn as a band),
    the mean completion length and the LoRA update norm."""
    from grpo_gsm8k.science.learning_signal import MEANS, UPDATE_NORM

    components = sorted(n for n in curves if n.startswith("rewards/") and n.endswith("/mean"))
    panels = [("share of groups / completions", [MEANS["zero_std_share"], MEANS["clipped_share"]]),
              ("reward components (mean ± std)", components),
              ("mean completion length (tokens)", [MEANS["mean_completion_length"]]),
              ("LoRA update norm ||scale·BA||", [UPDATE_NORM])]
    return [(title, [n for n in names if n in curves]) for title, names in panels
            if any(n in curves for n in names)]


SIGNAL_LABELS = {"frac_reward_zero_std": "groups with identical rewards", "completions/clipped_ratio":
                 "completions cut at max length"}


def plot_signal(path: Path, curves: dict[str, pd.DataFrame]) -> None:
    """The learning-signal diagnostics per logged step (see signal_panels); call only when signal_panels is not
    empty."""
    panels = signal_panels(curves)
    with _figure(path, ncols=len(panels), width=4.2 * len(panels), height=4.0) as (fig, axes):
        for ax, (title, names) in zip(axes, panels):
            for name in names:
                curve = curves[name]
                label = SIGNAL_LABELS.get(name, name.removeprefix("rewards/").removesuffix("/mean"))
                line, = ax.plot(curve.step, curve.value, marker="o" if len(curve) < 30 else None, markersize=3,
                                label=label)
                spread = curves.get(name.removesuffix("/mean") + "/std") if name.endswith("/mean") else None
                if spread is not None:
                    band = curve.merge(spread, on="step", suffixes=("", "_std"))
                    ax.fill_between(band.step, band.value - band.value_std, band.value + band.value_std,
                                    color=line.get_color(), alpha=0.2)
            if names[0] in SIGNAL_LABELS:
                ax.set_ylim(-0.05, 1.05)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("training step")
            if len(names) > 1:
                ax.legend(fontsize=8, loc="best")
        steps = max(len(curves[n]) for _, names in panels for n in names)
        fig.suptitle(f"GRPO learning signal (dvclive; n = {steps} logged steps)")


def draw_set_figures(folder: Path, result: dict, base: list[dict], tuned: list[dict], curves: dict) -> list[str]:
    """Every figure of one evaluation set into `folder` (the training ones where curves were logged); their names."""
    p = pair_by_question(base, tuned, GRADINGS["primary"])
    boot, alpha = result["bootstrap"], result["design"]["alpha"]
    plot_proportions(folder / FIGURES["proportion"], result["proportions"],
                     {m: (w["low"], w["high"]) for m, w in result["wilson"].items()},
                     {m: (boot[m]["low"], boot[m]["high"]) for m in MODELS}, int(p.qids.size),
                     {m: c["total"] for m, c in result["counts"].items()}, alpha)
    plot_differences(folder / FIGURES["difference"], p.qids.tolist(), p.tuned_scores - p.base_scores,
                     boot["diff"], boot["ci_low"], boot["ci_high"], alpha)
    plot_paired(folder / FIGURES["paired"], p.base_scores, p.tuned_scores)
    plot_lengths(folder / FIGURES["lengths"], pd.DataFrame(
        [{"model": m, "n_tokens": r["n_tokens"], "correct": r["correct"]} for m, rs in zip(MODELS, (base, tuned))
         for r in rs]))
    if curves:
        plot_training(folder / FIGURES["training"], curves)
    if signal_panels(curves):
        plot_signal(folder / FIGURES["signal"], curves)
    return sorted(path.name for path in folder.glob("*.png"))
