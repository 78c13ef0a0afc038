"""What passes between stages: the file names inside each stage's output folder and the fields of each record.

dvc.yaml names every stage's output folders and files and hands them to the stages as arguments; this module
names what lies inside them, once, for the stage that writes them and every stage or tool that reads them.
A reader checks a file against these fields up front, so a stale output is a clear error rather than a KeyError.
tests/test_contracts.py checks the file names here against the outs that dvc.yaml declares.
"""
from __future__ import annotations

import csv
from pathlib import Path

# data stage -> data/prepared/
TRAIN_PROMPTS = "train.jsonl"
VALIDATION_PROMPTS = "validation.jsonl"  # held-out train questions, never in train.jsonl (same row fields)
EVAL_FOLDER = "eval"  # one <set>.jsonl per evaluation set

# baseline and evaluate stages -> results/<stage>/<set>/
COMPLETIONS = "completions.jsonl"  # one record per sampled answer, COMPLETION_FIELDS
GREEDY = "greedy.jsonl"  # the temperature-0 answers (empty when evaluation.greedy is off)
ANSWER_METRICS = "metrics.json"
COMPLETION_FIELDS = {"qid": int, "sample": int, "question": str, "gold": str, "completion": str, "n_tokens": int,
                     "correct": bool, "ambiguous": bool, "mv_correct": bool}  # what the stats stage reads of each
ANSWER_METRICS_KEYS = ("correct", "total", "format_rate", "mean_tokens", "truncated_rate", "ambiguous",
                       "math_verify_correct")
# also in metrics.json, read by the card stage (the greedy two are None when evaluation.greedy is off)
ACCURACY_KEYS = ("accuracy", "questions", "greedy_correct", "greedy_accuracy")

# train stage -> results/train/summary.json and the dvclive folder results/train/live/
TRAIN_SUMMARY_KEYS = ("run_id", "global_step", "resumed_from_step", "mean_loss", "mean_reward", "final_reward",
                      "uploaded_steps", "remote", "zero_std_share", "clipped_share", "mean_completion_length",
                      "lora_update_norm", "rewards", "validation")
LIVE_METRICS = Path("plots") / "metrics"  # dvclive writes <logged name>.tsv under it, one row per logged step

# select stage -> models/adapter/ and results/select.json; the card stage -> models/adapter/README.md
ADAPTER_CONFIG = "adapter_config.json"  # peft's names: PeftModel.from_pretrained(base, folder) reads these two
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
MODEL_CARD = "README.md"  # the Hugging Face model card, read by the hub when the folder is uploaded
SELECT_KEYS = ("step", "reason", "rule", "rule_step", "validation_rule", "validation_step", "validation_accuracy",
               "validation_points", "saved_steps", "checkpoint")
# select.json's validation_accuracy keys, one per candidate step; the figure's and the report's labels
SELECT_CANDIDATES = ("select.step", "validation rule", "reward rule")
SELECTION_FIGURE = "selection.png"  # the select stage's figure, inside the report's figures folder

# stats stage -> results/stats/<set>.json, <set>-swaps.json, <set>-metrics.json and reports/figures/<set>/
STATS_KEYS = ("counts", "proportions", "wilson", "two_proportion", "per_question", "gee", "bootstrap", "mcnemar",
              "power", "grading", "lengths", "design", "training", "figures", "behaviours")
FIGURES = {"proportion": "proportion.png", "difference": "proportion_difference.png",
           "paired": "paired_questions.png", "lengths": "lengths.png", "training": "training.png",
           "signal": "signal.png"}  # inside reports/figures/<set>/


STATS_SUFFIXES = {"result": ".json", "swaps": "-swaps.json", "metrics": "-metrics.json"}  # after the set's name


def stats_files(folder: Path, set_name: str) -> dict[str, Path]:
    """The stats stage's three JSON outputs for one evaluation set, inside its output folder."""
    return {kind: Path(folder) / f"{set_name}{suffix}" for kind, suffix in STATS_SUFFIXES.items()}


def read_metric(live_dir: Path, name: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one logged metric, e.g. "loss" or "reward"; [] if it was never logged."""
    tsv = Path(live_dir) / LIVE_METRICS / f"{name}.tsv"
    if not tsv.is_file():
        return []
    with tsv.open() as handle:
        return [(int(row["step"]), float(row[Path(name).name])) for row in csv.DictReader(handle, delimiter="\t")]


def read_curves(live_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric in a dvclive folder, by its logged name ("rewards/format_reward/mean" for nested ones)."""
    root = Path(live_dir) / LIVE_METRICS
    names = sorted(tsv.relative_to(root).with_suffix("").as_posix() for tsv in root.rglob("*.tsv"))
    return {name: read_metric(live_dir, name) for name in names}
