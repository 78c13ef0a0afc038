"""The train stage under `accelerate launch` with 2 CPU processes (gloo): same optimizer-step shape, checkpoints
written once, the adapter trained, and every process resumes from the same checkpoint to the same weights."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.test_resume import MOVED, TOLERANCE, distance_from_init, final_adapter, max_difference, setup_run, \
    train_command


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_cpu_processes_train_checkpoint_and_resume(tmp_path, tiny_model_dir, compiled):
    """compiled: train.compile true under DDP (on a GPU, auto turns it on); the resume half runs eager only, the
    single-process stage test resumes a compiled run."""
    folder = tmp_path / "run"
    params = setup_run(folder, tiny_model_dir, remote="")
    text = params.read_text()
    for key, value in {"num_processes": 2, "accelerate_config": str(REPO / "configs/accelerate/cpu.yaml"),
                       "max_steps": 3, "gradient_accumulation_steps": 2, "compile": compiled}.items():
        text = _set_train_param(text, key, value)
    params.write_text(text)
    env = {**os.environ, "GRPO_GSM8K_PORT": "29631", "OMP_NUM_THREADS": "1"}

    first = subprocess.run(train_command(folder, params), cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["global_step"] == 3 and summary["resumed_from_step"] == 0
    assert summary["validation"]["passes"] == 1  # step 0 only (eval_steps 4), answered by process 0 alone
    assert sorted(p.name for p in (folder / "ckpt").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert first.stdout.count(f"'compiled_layers': {2 if compiled else 0}") == 2, first.stdout[-2000:]
    uninterrupted = final_adapter(folder, step=3)
    assert distance_from_init(uninterrupted) > MOVED, "the adapter never moved: DDP trained nothing"
    if compiled:
        return

    shutil.rmtree(folder / "ckpt" / "checkpoint-3")  # as if killed before the last save
    second = subprocess.run(train_command(folder, params), cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["global_step"] == 3 and summary["resumed_from_step"] == 2
    assert second.stdout.count("resuming run") == 2, "each of the two processes resumes"
    assert max_difference(uninterrupted, final_adapter(folder, step=3)) <= TOLERANCE


def _set_train_param(text: str, key: str, value) -> str:
    import yaml

    params = yaml.safe_load(text)
    params["train"][key] = value
    return yaml.safe_dump(params, sort_keys=False)
