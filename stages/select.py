"""Select stage: pick the checkpoint whose adapters are evaluated, and record why.

    python -m stages.select --checkpoints models/checkpoints --live results/train/live \
        --adapter models/adapter --out results/select.json

The checkpoint is chosen by hand: `select.step` in params.yaml (whose comment says why the study chose its step).
Beside it an automatic rule is computed and reported, never silently used: the last saved checkpoint at or before
the peak of the moving average (over `select.smoothing_window` logged points) of the mean training reward.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
from pathlib import Path

from grpo_gsm8k.contracts import ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_WEIGHTS, read_metric
from grpo_gsm8k.io import atomic_file, fail, write_json
from grpo_gsm8k.params import SelectParams, load_params
from grpo_gsm8k.training.checkpoint_sync import local_checkpoints, local_is_complete


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


def canonical_adapter_config(path: Path) -> dict:
    """peft writes "all-linear" target modules from a set, in hash order; sorted, equal runs give equal bytes."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    return config


def run(select: SelectParams, checkpoints: Path, live_dir: Path, adapter_dir: Path, out_json: Path) -> dict:
    saved = {step: folder for step, folder in local_checkpoints(checkpoints).items()
             if local_is_complete(folder, step, verify_hashes=False)}
    if select.step not in saved:
        raise ValueError(f"select.step={select.step} has no complete checkpoint in {checkpoints}; "
                         f"saved steps: {sorted(saved) or 'none'}; set select.step to one of them")
    chosen = saved[select.step]
    missing = [name for name in ADAPTER_FILES if not (chosen / name).is_file()]
    if missing:
        raise ValueError(f"{chosen} lacks {missing[0]}; it is not a LoRA checkpoint, rerun the train stage")
    rule_step = reward_peak_step(read_metric(live_dir, "reward"), sorted(saved), select.smoothing_window)
    record = {
        "step": select.step,
        "reason": f"select.step={select.step} in params.yaml, chosen by hand",
        "rule": f"last checkpoint at or before the peak of the {select.smoothing_window}-point moving average "
                "of the mean training reward",
        "rule_step": rule_step,
        "saved_steps": sorted(saved),
        "checkpoint": chosen.name,
    }
    # The two adapter files only (the card stage writes the folder's README.md), renamed into place once both are
    # written.
    with contextlib.ExitStack() as stack:
        weights = stack.enter_context(atomic_file(adapter_dir / ADAPTER_WEIGHTS))
        config = stack.enter_context(atomic_file(adapter_dir / ADAPTER_CONFIG))
        shutil.copy2(chosen / ADAPTER_WEIGHTS, weights)
        write_json(config, canonical_adapter_config(chosen / ADAPTER_CONFIG))
    write_json(out_json, record)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--checkpoints", type=Path, required=True)
    parser.add_argument("--live", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    with fail():
        record = run(load_params(args.params).select, args.checkpoints, args.live, args.adapter, args.out)
    print("select:", json.dumps(record))


if __name__ == "__main__":
    main()
