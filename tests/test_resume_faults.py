"""The train stage's resume under faults: a fresh machine keeps the training curves, and a checkpoints folder
that cannot be written fails with one line. Real S3 server, real files, the stage's own run()/main(); no training
(the checkpoints are fabricated the way Trainer writes them).

    python -m pytest tests/test_resume_faults.py -q
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import s3fs
from transformers import TrainerControl, TrainerState, TrainingArguments

from grpo_gsm8k.training.checkpoint_sync import CheckpointSync, RemoteStore
from grpo_gsm8k.params import load_params
from grpo_gsm8k.training.live_log import LiveLogger
from stages import train
from tests.conftest import ONE_BATCH, cpu_params_dict, write_params
from tests.test_checkpoint_sync import write_checkpoint

STEPS = 4


def stage_folder(folder: Path, remote: str = "") -> Path:
    """params.yaml, a base-model folder and a train.jsonl: all run_identity reads before any training."""
    (folder / "base").mkdir(parents=True)
    (folder / "base" / "source.json").write_text(json.dumps({"kind": "local", "source": "tiny"}))
    (folder / "train.jsonl").write_text(json.dumps({"prompt": "1+1?", "answer": "2", "qid": "q0"}) + "\n")
    return write_params(folder / "params.yaml", cpu_params_dict(**{
        **ONE_BATCH, "train.max_steps": STEPS, "train.save_steps": 2, "train.checkpoint_remote": remote,
        "select.step": STEPS}))


def stage_paths(folder: Path) -> dict:
    return {"model_dir": folder / "base", "data_path": folder / "train.jsonl", "checkpoints": folder / "ckpt",
            "live_dir": folder / "live", "summary_path": folder / "summary.json"}


def log_rows(step: int) -> dict:
    """One Trainer.log call of a GRPO step: what on_log gets (and log_history keeps, with "step")."""
    return {"loss": round(0.5 / step, 4), "grad_norm": 0.25 * step, "learning_rate": 5e-5,
            "reward": 0.1 * step, "rewards/correctness/mean": 0.05 * step, "epoch": step / 8}


def train_like_trainer(live_dir: Path, ckpt_root: Path, steps: int) -> None:
    """LiveLogger fed as Trainer feeds it; a checkpoint with trainer_state.json every 2 steps."""
    args = TrainingArguments(output_dir=str(ckpt_root), report_to="none")
    state, control, logger = TrainerState(), TrainerControl(), LiveLogger(live_dir)
    logger.on_train_begin(args, state, control)
    for step in range(1, steps + 1):
        state.global_step = step
        state.log_history.append({**log_rows(step), "step": step})
        logger.on_log(args, state, control, logs=log_rows(step))
        if step % 2 == 0:
            write_checkpoint(ckpt_root, step)
            state.save_to_json(str(ckpt_root / f"checkpoint-{step}" / "trainer_state.json"))
    final = {"train_runtime": 1.0, "train_loss": 0.3, "epoch": steps / 8}  # logged after the last save
    state.log_history.append({**final, "step": steps})
    logger.on_log(args, state, control, logs=final)
    logger.on_train_end(args, state, control)


def live_files(live_dir: Path) -> dict[str, str]:
    return {p.relative_to(live_dir).as_posix(): p.read_text() for p in sorted(live_dir.rglob("*")) if p.is_file()}


@pytest.fixture
def s3_env(shared_s3_server, monkeypatch):
    for name, value in shared_s3_server.env().items():  # the stage takes its endpoint from AWS_* like dvc does
        monkeypatch.setenv(name, value)
    return shared_s3_server


def test_fresh_machine_resuming_a_finished_run_from_s3_keeps_its_curves(tmp_path, s3_env):
    remote = f"s3://{s3_env.bucket}/resume-faults/{tmp_path.name}"
    first = tmp_path / "first"
    params = load_params(stage_folder(first, remote))
    paths = stage_paths(first)
    run_id = train.run_identity(params, paths["model_dir"], paths["data_path"])["run_id"]
    train_like_trainer(paths["live_dir"], paths["checkpoints"], STEPS)
    sync = CheckpointSync(paths["checkpoints"], f"{remote}/{run_id}", keep=2)
    sync.enqueue(2, 4)
    assert sync.wait_idle(60) and sorted(sync.uploaded) == [2, 4]
    sync.close()
    expected = live_files(paths["live_dir"])

    fresh = tmp_path / "fresh"  # a new machine: the same inputs, no checkpoints, no curves
    stage_folder(fresh, remote)
    summary = train.run(params, **stage_paths(fresh))
    assert summary["global_step"] == STEPS and summary["resumed_from_step"] == STEPS
    assert summary["mean_loss"] == pytest.approx(sum(log_rows(s)["loss"] for s in range(1, STEPS + 1)) / STEPS)
    assert summary["final_reward"] == pytest.approx(log_rows(STEPS)["reward"])
    got = live_files(fresh / "live")
    tsvs = {name for name in expected if name.endswith(".tsv")}
    assert tsvs and {name for name in got if name.endswith(".tsv")} == tsvs
    assert {name: got[name] for name in tsvs} == {name: expected[name] for name in tsvs}


def test_resuming_rewrites_the_curves_from_the_checkpoint(tmp_path):
    """The live dir of a resumed run holds exactly the checkpoint's log up to its step, whatever it held before."""
    paths = stage_paths(tmp_path)
    train_like_trainer(paths["live_dir"], paths["checkpoints"], STEPS)
    expected_dir = tmp_path / "expected"
    train_like_trainer(expected_dir, tmp_path / "unused", 2)
    (paths["live_dir"] / "plots" / "metrics" / "loss.tsv").unlink()  # a damaged or stale live dir
    state = TrainerState.load_from_json(str(paths["checkpoints"] / "checkpoint-2" / "trainer_state.json"))
    args = TrainingArguments(output_dir=str(paths["checkpoints"]), report_to="none")
    LiveLogger(paths["live_dir"]).on_train_begin(args, state, TrainerControl())  # what a resumed Trainer calls
    got, expected = live_files(paths["live_dir"]), live_files(expected_dir)
    assert {k: v for k, v in got.items() if k.endswith(".tsv")} == \
        {k: v for k, v in expected.items() if k.endswith(".tsv")}


def test_rerunning_a_finished_run_uploads_the_checkpoints_s3_missed(tmp_path, s3_env):
    """The run ended while S3 was down, so its last uploads never happened: a rerun trains nothing, uploads them."""
    remote = f"s3://{s3_env.bucket}/resume-faults/{tmp_path.name}"
    params = load_params(stage_folder(tmp_path, remote))
    paths = stage_paths(tmp_path)
    identity = train.run_identity(params, paths["model_dir"], paths["data_path"])
    train.claim_run(paths["checkpoints"], paths["live_dir"], identity)
    train_like_trainer(paths["live_dir"], paths["checkpoints"], STEPS)
    summary = train.run(params, **paths)
    assert summary["global_step"] == STEPS and summary["uploaded_steps"] == [2, 4]
    assert sorted(RemoteStore(f"{remote}/{identity['run_id']}").complete_steps()) == [2, 4]


def tsv_rows(live_dir: Path) -> dict[str, list[list[str]]]:
    return {name: [line.split("\t") for line in text.splitlines()[1:]]
            for name, text in live_files(live_dir).items() if name.endswith(".tsv")}


@pytest.mark.slow
def test_fresh_machine_resuming_mid_run_from_s3_continues_the_same_curves(tmp_path, tiny_model_dir, s3_env):
    """Real GRPO steps on the tiny model. A run whose machine died after checkpoint-2 reached S3, resumed on a new
    machine, ends with the uninterrupted run's curves: steps 1-2 from the checkpoint, step 3 trained again."""
    from stages import data

    remote, steps = f"s3://{s3_env.bucket}/resume-faults/{tmp_path.name}", 3

    def prepare(folder: Path):
        folder.mkdir()
        params = load_params(write_params(folder / "params.yaml", cpu_params_dict(**{
            **ONE_BATCH, "model.source": str(tiny_model_dir), "data.train_questions": 8 * steps,
            "train.max_steps": steps, "train.save_steps": 1, "train.max_completion_length": 8, "reward.min_tokens": 4,
            "train.checkpoint_remote": remote,
            "select.step": steps})))
        data.run(params.data, params.evaluation, params.seed, folder / "prepared")
        (folder / "base").mkdir()
        (folder / "base" / "source.json").write_text(json.dumps({"kind": "local", "source": str(tiny_model_dir)}))
        return params, {**stage_paths(folder), "data_path": folder / "prepared" / "train.jsonl"}

    params, paths = prepare(tmp_path / "straight")
    straight = train.run(params, **paths)
    assert straight["global_step"] == steps
    RemoteStore(f"{remote}/{straight['run_id']}").delete(steps)  # the machine died before uploading step 3
    params, paths = prepare(tmp_path / "fresh")
    resumed = train.run(params, **paths)
    assert resumed["resumed_from_step"] == steps - 1 and resumed["global_step"] == steps
    expected, got = tsv_rows(tmp_path / "straight" / "live"), tsv_rows(tmp_path / "fresh" / "live")
    assert "plots/metrics/loss.tsv" in expected and got.keys() == expected.keys()
    assert [r[0] for r in got["plots/metrics/loss.tsv"]] == [str(s) for s in range(1, steps + 1)]
    for name, rows in expected.items():
        assert [r[0] for r in got[name]] == [r[0] for r in rows], name
        before = [r for r in rows if int(r[0]) < steps]  # logged before the checkpoint: carried by it, exactly
        assert before and [r for r in got[name] if int(r[0]) < steps] == before, name
    for name in ("loss", "reward"):  # trained again after the resume: the same numbers (timings differ)
        assert float(got[f"plots/metrics/{name}.tsv"][-1][1]) == \
            pytest.approx(float(expected[f"plots/metrics/{name}.tsv"][-1][1]), rel=1e-4, abs=1e-6)
    assert resumed["mean_loss"] == pytest.approx(straight["mean_loss"], rel=1e-4, abs=1e-6)


@contextlib.contextmanager
def unwritable(folder: Path):
    """Make `folder` unwritable even for root: chmod does not stop root, the immutable attribute does (ext4)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot make a folder unwritable for root here: chattr +i: {done.stderr.strip()}")
    else:
        folder.chmod(0o555)
    try:
        yield folder
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)


@pytest.mark.parametrize("case", [
    "another_runs_checkpoints",  # params changed: the old run must go, but the folder refuses
    "this_runs_folder",  # a resume of this run: it could not save a single checkpoint
    "parent_unwritable",  # a fresh machine: the folder cannot be created
])
def test_unwritable_checkpoints_folder_is_one_line(tmp_path, case, capsys):
    params_file = stage_folder(tmp_path)
    paths = stage_paths(tmp_path)
    ckpt = paths["checkpoints"]
    if case == "parent_unwritable":
        ckpt = tmp_path / "locked" / "ckpt"
        locked = tmp_path / "locked"
    else:
        ckpt.mkdir()
        write_checkpoint(ckpt, 2)
        identity = train.run_identity(load_params(params_file), paths["model_dir"], paths["data_path"])
        run_id = identity["run_id"] if case == "this_runs_folder" else "another-run"
        (ckpt / train.RUN_FILE).write_text(json.dumps({**identity, "run_id": run_id}))
        (ckpt / "checkpoint-2" / "trainer_state.json").unlink()  # incomplete: nothing to resume from
        locked = ckpt
    argv = ["--params", str(params_file), "--model", str(paths["model_dir"]), "--data", str(paths["data_path"]),
            "--checkpoints", str(ckpt), "--live", str(paths["live_dir"]), "--summary", str(paths["summary_path"]),
            "--validation", str(tmp_path / "validation.jsonl")]
    with unwritable(locked), pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert str(ckpt) in err[0] and "not writable" in err[0], err[0]
    assert not paths["summary_path"].exists()


@pytest.mark.parametrize("variable, value, says, never", [
    ("AWS_SECRET_ACCESS_KEY", "not-the-secret", "credentials", "start the server"),  # the server answered: no
    ("AWS_ENDPOINT_URL,AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9", "start the server", "credentials"),  # nothing listens there
])
def test_an_unusable_remote_is_one_error_naming_the_right_fix(tmp_path, s3_env, monkeypatch, variable, value, says,
                                                              never):
    params = load_params(stage_folder(tmp_path, f"s3://{s3_env.bucket}/resume-faults/{tmp_path.name}"))
    for name in variable.split(","):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses a filesystem made with the old environment
    try:
        with pytest.raises(ValueError) as error:
            train.run(params, **stage_paths(tmp_path))
    finally:  # nor may a later test reuse this one's, made with the broken environment
        s3fs.S3FileSystem.clear_instance_cache()
    message = str(error.value)
    assert "train.checkpoint_remote" in message and says in message and never not in message, message
    assert "\n" not in message
