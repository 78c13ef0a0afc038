"""Training survives kill -9: rerunning the train stage resumes from the newest complete checkpoint (local, or on
S3 when the local folder is gone) at the same step with the same data order, and ends where an uninterrupted run
ends. Real S3 server, real TRL, the tiny model, and a reward that varies within groups (the study's rewards are
all 0 for a tiny random model, so its adapter would never move and every run would "match")."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo_gsm8k.training.checkpoint_sync import RemoteStore
from grpo_gsm8k.params import load_params
from stages import data
from tests.conftest import ONE_BATCH, REPO, cpu_params_dict, write_params
from tests.rewards_for_tests import TOKEN_VARIANT

STEPS = 6
TOLERANCE = 1e-5  # fp32 on CPU; resumed and uninterrupted runs replay the same RNG states


def moved_bound(learning_rate: float) -> float:
    """The least distance_from_init that counts as "the adapter moved": a tenth of one Adam step. Adam moves every
    entry with a gradient by about the learning rate per step, so one step with any signal clears it; a run
    without signal stays at exactly 0."""
    return learning_rate / 10


MOVED = moved_bound(1e-2)  # 100 x TOLERANCE: the tiny-model runs of these tests train at lr 1e-2


def setup_run(folder: Path, tiny_model_dir: Path, remote: str) -> Path:
    folder.mkdir()
    params = write_params(folder / "params.yaml", cpu_params_dict(**{
        **ONE_BATCH, "model.source": str(tiny_model_dir), "data.train_questions": 8 * STEPS, "train.max_steps": STEPS,
        "train.save_steps": 1, "train.max_completion_length": 8, "train.learning_rate": 1e-2,
        "train.keep_checkpoints": 2, "train.checkpoint_remote": remote, "select.step": STEPS,
        "reward.variant": TOKEN_VARIANT}))
    loaded = load_params(params)
    data.run(loaded.data, loaded.evaluation, loaded.seed, folder / "prepared")
    (folder / "base").mkdir()
    (folder / "base" / "source.json").write_text(json.dumps({"kind": "local", "source": str(tiny_model_dir)}))
    return params


def train_command(folder: Path, params: Path) -> list[str]:
    return [sys.executable, "-m", "stages.train", "--params", str(params), "--model", str(folder / "base"),
            "--data", str(folder / "prepared" / "train.jsonl"), "--checkpoints", str(folder / "ckpt"),
            "--live", str(folder / "live"), "--summary", str(folder / "summary.json"),
            "--validation", str(folder / "prepared" / "validation.jsonl")]  # the preset's: steps 0 and 4


def run_to_end(folder: Path, params: Path, env: dict) -> dict:
    done = subprocess.run(train_command(folder, params), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((folder / "summary.json").read_text())


def kill_after_checkpoint(folder: Path, params: Path, env: dict, step: int) -> None:
    process = subprocess.Popen(train_command(folder, params), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (folder / "ckpt" / f"checkpoint-{step}" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "training ended before the checkpoint"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()


def final_adapter(folder: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(folder / "ckpt" / f"checkpoint-{step}" / "adapter_model.safetensors")


def distance_from_init(adapter: dict[str, torch.Tensor]) -> float:
    """How far the least-moved lora_B tensor went (its largest |entry|): peft starts every lora_B at exactly 0."""
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b, sorted(adapter)
    return min(tensor.abs().max().item() for tensor in lora_b)


def max_difference(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    assert expected.keys() == got.keys()
    return max((expected[k] - got[k]).abs().max().item() for k in expected)


@pytest.fixture(scope="module")
def straight_adapter(tmp_path_factory, tiny_model_dir) -> dict[str, torch.Tensor]:
    """The final adapter of an uninterrupted run (checkpoint_remote does not shape training, so none here)."""
    folder = tmp_path_factory.mktemp("straight") / "run"
    params = setup_run(folder, tiny_model_dir, remote="")
    assert run_to_end(folder, params, dict(os.environ))["global_step"] == STEPS
    adapter = final_adapter(folder)
    assert distance_from_init(adapter) > MOVED, "the adapter never moved: the comparisons below would be empty"
    return adapter


@pytest.mark.slow
def test_kill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, s3_server, straight_adapter):
    env = {**os.environ, **s3_server.env()}
    remote = f"s3://{s3_server.bucket}/checkpoints"
    params = setup_run(tmp_path / "killed", tiny_model_dir, remote)
    kill_after_checkpoint(tmp_path / "killed", params, env, step=2)
    summary = run_to_end(tmp_path / "killed", params, env)
    assert summary["global_step"] == STEPS and 2 <= summary["resumed_from_step"] < STEPS, summary

    assert max_difference(straight_adapter, final_adapter(tmp_path / "killed")) <= TOLERANCE
    loss = [line.split("\t")[0] for line in (tmp_path / "killed" / "live/plots/metrics/loss.tsv").read_text()
            .splitlines()[1:]]
    assert loss == [str(step) for step in range(1, STEPS + 1)], "curve steps repeated or missing after resume"

    # Every checkpoint reached the server; pruning kept the newest two plus select.step and the validation rule's
    # step (the only validated adapter, step 4, validated after the resume).
    store = RemoteStore(f"{remote}/{summary['run_id']}", s3_server.storage_options())
    assert summary["validation"]["rule_step"] == 4
    assert sorted(store.complete_steps()) == [4, STEPS - 1, STEPS]


@pytest.mark.slow
def test_fresh_machine_resumes_from_s3(tmp_path, tiny_model_dir, s3_server, straight_adapter):
    env = {**os.environ, **s3_server.env()}
    params = setup_run(tmp_path / "run", tiny_model_dir, f"s3://{s3_server.bucket}/checkpoints")
    kill_after_checkpoint(tmp_path / "run", params, env, step=3)
    run_dir = tmp_path / "run"
    run_file = json.loads((run_dir / "ckpt" / "run.json").read_text())
    store = RemoteStore(f"s3://{s3_server.bucket}/checkpoints/{run_file['run_id']}", s3_server.storage_options())
    deadline = time.time() + 60
    while not store.complete_steps() and time.time() < deadline:
        time.sleep(0.5)  # the killed run's background upload may not have finished: rerun uploads the rest
    uploaded = max(store.complete_steps(), default=0)
    assert 1 <= uploaded < STEPS, f"{uploaded} checkpoints reached the server before the kill"
    shutil.rmtree(run_dir / "ckpt")  # a fresh machine: nothing local
    summary = run_to_end(run_dir, params, env)
    assert summary["global_step"] == STEPS
    assert summary["resumed_from_step"] == uploaded
    assert max_difference(straight_adapter, final_adapter(run_dir)) <= TOLERANCE
