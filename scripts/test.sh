#!/usr/bin/env bash
# Install, then run every test (unit tables, stage smoke runs, real S3 server, real dvc repro/push/pull/exp run).
#   bash scripts/test.sh            # all tests (about 25 minutes on 2 cores)
#   bash scripts/test.sh -m "not slow"   # the quick tiers only
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python -m pytest "$@"
