#!/usr/bin/env bash
# The main job on the CPU preset: install, start the local S3 server, run the whole pipeline, push every output.
#   bash scripts/demo.sh
# Point DVC at a real bucket instead: see README ("Remote storage").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1   # everything the preset needs is on disk
python -m grpo_gsm8k.s3server start
eval "$(python -m grpo_gsm8k.s3server env)"
dvc exp run $(python -m grpo_gsm8k.preset cpu)
dvc push
echo "demo: report at reports/report.html; outputs pushed to $(dvc remote list | head -n 1)"
