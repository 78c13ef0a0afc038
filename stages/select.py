"""Select stage: pick the checkpoint whose adapters are evaluated, and record why.

    python -m stages.select --checkpoints models/checkpoints --live results/train/live \
        --adapter models/adapter --out results/select.json --figure reports/figures/selection.png

`select.rule` chooses: `step` (the study's way) takes `select.step` from params.yaml, chosen by hand; `validation`
takes the saved step with the best moving average (over `select.validation_window` points) of the validation
accuracy the train stage logged on held-out train questions (grpo_gsm8k/science/selection.py). Both candidates
are recorded with their validation accuracy, beside a third, never used: the last saved checkpoint at or before
the peak of the moving average (over `select.smoothing_window` logged points) of the mean training reward. The
figure shows the curves with the three steps marked.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
from pathlib import Path

from grpo_gsm8k.contracts import ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_WEIGHTS, SELECT_CANDIDATES, read_metric
from grpo_gsm8k.io import atomic_file, fail, write_json
from grpo_gsm8k.params import SelectParams, load_params
from grpo_gsm8k.science.selection import VALIDATION_ACCURACY, best_validation_step, reward_peak_step, value_at
from grpo_gsm8k.science.selection_figure import plot_selection
from grpo_gsm8k.training.checkpoint_sync import local_checkpoints, local_is_complete



def canonical_adapter_config(path: Path) -> dict:
    """peft writes "all-linear" target modules from a set, in hash order; sorted, equal runs give equal bytes."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    return config


def choose_step(select: SelectParams, saved: list[int], validation_step: int | None, live_dir: Path) -> tuple[int, str]:
    """(step, reason) under select.rule; a step without a complete checkpoint is an error naming the fix."""
    if select.rule == "validation":
        if validation_step is None:
            raise ValueError(f"select.rule=validation but no saved checkpoint has a validation point in {live_dir}; "
                             "set data.validation_questions above 0 and rerun train, or use select.rule=step")
        return validation_step, (f"select.rule=validation: the saved step with the best {select.validation_window}"
                                 "-point moving average of the validation accuracy (ties to the earlier step)")
    if select.step not in saved:
        raise ValueError(f"select.step={select.step} has no complete checkpoint; saved steps: {saved or 'none'}; "
                         "set select.step to one of them")
    return select.step, f"select.step={select.step} in params.yaml, chosen by hand"


def run(select: SelectParams, checkpoints: Path, live_dir: Path, adapter_dir: Path, out_json: Path,
        figure: Path) -> dict:
    saved = {step: folder for step, folder in local_checkpoints(checkpoints).items()
             if local_is_complete(folder, step, verify_hashes=False)}
    validation, reward = read_metric(live_dir, VALIDATION_ACCURACY), read_metric(live_dir, "reward")
    validation_step = best_validation_step(validation, sorted(saved), select.validation_window)
    rule_step = reward_peak_step(reward, sorted(saved), select.smoothing_window)
    step, reason = choose_step(select, sorted(saved), validation_step, live_dir)
    chosen = saved[step]
    missing = [name for name in ADAPTER_FILES if not (chosen / name).is_file()]
    if missing:
        raise ValueError(f"{chosen} lacks {missing[0]}; it is not a LoRA checkpoint, rerun the train stage")
    candidates = dict(zip(SELECT_CANDIDATES, (select.step, validation_step, rule_step)))
    record = {
        "step": step,
        "reason": reason,
        "rule": f"last checkpoint at or before the peak of the {select.smoothing_window}-point moving average "
                "of the mean training reward",
        "rule_step": rule_step,
        "validation_rule": f"the saved step with the best {select.validation_window}-point moving average of the "
                           "validation accuracy",
        "validation_step": validation_step,
        # Each candidate's own logged validation accuracy (None: not validated at that step).
        "validation_accuracy": {label: value_at(validation, at) for label, at in candidates.items()},
        "validation_points": len(validation),
        "saved_steps": sorted(saved),
        "checkpoint": chosen.name,
    }
    # The two adapter files only (the card stage writes the folder's README.md), renamed into place once both are
    # written.
    with contextlib.ExitStack() as stack:
        weights = stack.enter_context(atomic_file(adapter_dir / ADAPTER_WEIGHTS))
        config = stack.enter_context(atomic_file(adapter_dir / ADAPTER_CONFIG))
        drawn = stack.enter_context(atomic_file(figure))
        shutil.copy2(chosen / ADAPTER_WEIGHTS, weights)
        write_json(config, canonical_adapter_config(chosen / ADAPTER_CONFIG))
        plot_selection(drawn, validation, reward, candidates,
                       chosen="validation rule" if select.rule == "validation" else "select.step",
                       windows={"validation": select.validation_window, "reward": select.smoothing_window})
    write_json(out_json, record)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--checkpoints", type=Path, required=True)
    parser.add_argument("--live", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--figure", type=Path, required=True, help="the selection figure (PNG)")
    args = parser.parse_args(argv)
    with fail():
        record = run(load_params(args.params).select, args.checkpoints, args.live, args.adapter, args.out,
                     args.figure)
    print("select:", json.dumps(record))


if __name__ == "__main__":
    main()
