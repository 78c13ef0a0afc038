"""Presets: named sets of param overrides kept in presets/<name>.yaml (dotted keys, as `dvc exp run -S` takes).

    dvc exp run $(python -m grpo_gsm8k.tools.preset gpu-smoke)    # run the pipeline with the preset applied
    python -m grpo_gsm8k.tools.preset cpu --write params.yaml     # or write it into a params file, then `dvc repro`  (values with spaces: only this way)

Each override must name an existing param, so a typo fails here instead of silently doing nothing.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import yaml

from grpo_gsm8k.params import params_from_dict

PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"  # the project root, two folders up


def load_preset(name: str, presets_dir: Path = PRESETS_DIR) -> dict[str, object]:
    path = presets_dir / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in presets_dir.glob("*.yaml")))
        raise ValueError(f"preset {name!r} not found in {presets_dir}; choose one of: {known}")
    try:
        overrides = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML ({' '.join(str(err).split())}); fix that file") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"{path} must be a mapping of dotted keys to values (train.max_steps: 16), "
                         f"not a {type(overrides).__name__}; fix that file")
    return overrides


def apply_overrides(params: dict, overrides: dict[str, object]) -> dict:
    merged = copy.deepcopy(params)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = merged
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise ValueError(f"preset key {dotted!r} does not name a param in params.yaml; fix the preset")
        if leaf not in node:
            raise ValueError(f"preset key {dotted!r} does not name a param in params.yaml; fix the preset")
        # Setting a section whole would drop its other keys (or put a number where a section belongs); the
        # evaluation sets are the exception, their names being the user's choice.
        if isinstance(node[leaf], dict) and not (dotted + ".").startswith("evaluation.sets."):
            raise ValueError(f"preset key {dotted!r} names a whole section; set its keys one by one "
                             f"({dotted}.{next(iter(node[leaf]), 'key')}: ...)")
        node[leaf] = value
    return merged


def set_param_args(overrides: dict[str, object]) -> list[str]:
    """`-S key=value` pairs, each value written so that dvc, which reads it as YAML, gets it back unchanged: JSON
    without spaces for numbers, booleans and lists; a string bare unless YAML would read it as something else."""
    args = []
    for dotted, value in overrides.items():
        compact = json.dumps(value, separators=(",", ":"))
        text = value if isinstance(value, str) and yaml.safe_load(value) == value else compact
        if any(ch.isspace() for ch in text):
            raise ValueError(f"preset value of {dotted!r} contains whitespace, which `dvc exp run $(...)` would split; "
                             "apply the preset with --write params.yaml, then run `dvc exp run`")
        args += ["-S", f"{dotted}={text}"]
    return args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--write", type=Path, help="write params with the preset applied to this file")
    args = parser.parse_args(argv)
    try:
        overrides = load_preset(args.name, PRESETS_DIR)
        merged = apply_overrides(yaml.safe_load(args.params.read_text()), overrides)
        params_from_dict(merged)  # a preset that would only fail in a stage fails here, before any run
        set_args = None if args.write else set_param_args(overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    if args.write:
        args.write.write_text(yaml.safe_dump(merged, sort_keys=False, width=120))
    else:
        print(" ".join(set_args))


if __name__ == "__main__":
    main()
