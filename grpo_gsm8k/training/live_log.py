"""Training curves with dvclive, indexed by the trainer's global step (so `dvc plots show` and resumes agree).

dvclive's own HF callback counts log calls, not optimizer steps; a resumed run would then restart its x-axis.
Here every logged value is written at `state.global_step`. The curves travel with every checkpoint: Trainer keeps
each log call in `trainer_state.json`'s `log_history`, so a resume (from local disk or from S3 on a fresh machine)
rewrites the live dir from the checkpoint's log before appending, and ends with the curves of an uninterrupted run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback

SKIPPED = {"epoch", "step", "total_flos", "train_loss", "train_runtime", "train_samples_per_second",
           "train_steps_per_second"}  # end-of-run summaries and log_history's own step, not curves


def log_row(live, step: int, logs: dict) -> None:
    """One Trainer log call (or one log_history entry) as one row of each of its curves."""
    live.step = step
    for key, value in logs.items():
        if key not in SKIPPED and isinstance(value, (int, float)) and math.isfinite(value):
            live.log_metric(key, float(value))
    live.next_step()


def open_live(live_dir: Path, log_history: list[dict]):
    """A dvclive Live whose curves are exactly `log_history` (a resumed checkpoint's log, or [] for a new run)."""
    from dvclive import Live

    live = Live(dir=str(live_dir), resume=False, report=None, save_dvc_exp=False, dvcyaml=False)
    for entry in log_history:
        log_row(live, entry["step"], entry)
    return live


def log_history(checkpoint: Path) -> list[dict]:
    """The logs of the run up to a checkpoint, as its trainer_state.json carries them."""
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("log_history", [])


def restore_curves(live_dir: Path, checkpoint: Path) -> None:
    """Rewrite the live dir from a checkpoint's trainer_state.json (a finished run fetched onto a new machine)."""
    open_live(live_dir, log_history(checkpoint)).end()


class LiveLogger(TrainerCallback):
    def __init__(self, live_dir: Path):
        self.live_dir = Path(live_dir)
        self.live = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # a resumed Trainer has loaded the checkpoint's log_history by now
            self.live = open_live(self.live_dir, state.log_history)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.live is not None and logs:
            log_row(self.live, state.global_step, logs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.live is not None:
            self.live.end()
