#!/usr/bin/env bash
# The main job on the CPU preset: install, start the local S3 server, run the whole pipeline as the DVC experiment
# `cpu-demo`, push every output, then put the study's params.yaml back.
#   bash scripts/demo.sh
# Afterwards the workspace holds the demo's outputs (reports/report.html, results/, dvc.lock) while params.yaml is
# the study again, as committed: `git status` shows no change to tracked files, and a test run or a commit takes
# the study. `dvc exp show` lists the experiment; `dvc exp apply cpu-demo` brings its params back.
# Point DVC at a real bucket instead: see README ("Remote storage").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1   # everything the preset needs is on disk
python -m grpo_gsm8k.tools.s3server start
eval "$(python -m grpo_gsm8k.tools.s3server env)"
# The preset is written into params.yaml (its system prompt holds spaces, which `-S` on a command line would split)
# and `dvc exp run` takes the workspace as it is; keep the user's copy and put it back however the run ends.
saved="$(mktemp)"
cp params.yaml "$saved"
trap 'cp "$saved" params.yaml && rm -f "$saved"' EXIT
dvc exp remove cpu-demo >/dev/null 2>&1 || true   # a rerun replaces the demo's experiment (unchanged stages are skipped)
python -m grpo_gsm8k.tools.preset cpu --write params.yaml
dvc exp run -n cpu-demo
dvc push
echo "demo: report at reports/report.html (experiment cpu-demo); outputs pushed to $(dvc remote list | head -n 1)"
echo "demo: params.yaml is the study again; \`dvc exp show\` lists cpu-demo, \`dvc exp apply cpu-demo\` restores its params"
