"""Training curves with dvclive, indexed by the trainer's global step (so `dvc plots show` and resumes agree).

dvclive's own HF callback counts log calls, not optimizer steps; a resumed run would then restart its x-axis.
Here every logged value is written at `state.global_step`, and on resume the rows past the checkpoint being
resumed are dropped first (they were logged after it and will be logged again).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

from transformers import TrainerCallback

SKIPPED = {"epoch", "total_flos", "train_loss", "train_runtime", "train_samples_per_second",
           "train_steps_per_second"}  # end-of-run summaries, not curves


def trim_after(live_dir: Path, step: int) -> None:
    """Drop rows logged after `step` from every dvclive metric file."""
    for tsv in (Path(live_dir) / "plots" / "metrics").rglob("*.tsv"):
        with tsv.open() as handle:
            rows = list(csv.reader(handle, delimiter="\t"))
        header, body = rows[0], rows[1:]
        step_col = header.index("step")
        kept = [row for row in body if int(row[step_col]) <= step]
        with tsv.open("w", newline="") as handle:
            csv.writer(handle, delimiter="\t", lineterminator="\n").writerows([header, *kept])


def read_metric(live_dir: Path, name: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one logged metric, e.g. "loss" or "reward"; [] if it was never logged."""
    tsv = Path(live_dir) / "plots" / "metrics" / f"{name}.tsv"
    if not tsv.is_file():
        return []
    with tsv.open() as handle:
        return [(int(row["step"]), float(row[Path(name).name])) for row in csv.DictReader(handle, delimiter="\t")]


class LiveLogger(TrainerCallback):
    def __init__(self, live_dir: Path, resume_step: int = 0):
        self.live_dir, self.resume_step = Path(live_dir), resume_step
        self.live = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from dvclive import Live

        resume = self.resume_step > 0 and self.live_dir.exists()
        if resume:
            trim_after(self.live_dir, self.resume_step)
        self.live = Live(dir=str(self.live_dir), resume=resume, report=None, save_dvc_exp=False, dvcyaml=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.live is None or not logs:
            return
        self.live.step = state.global_step
        for key, value in logs.items():
            if key not in SKIPPED and isinstance(value, (int, float)) and math.isfinite(value):
                self.live.log_metric(key, float(value))
        self.live.next_step()

    def on_train_end(self, args, state, control, **kwargs):
        if self.live is not None:
            self.live.end()
