"""Tests for grpo_gsm8k.training.checkpoint_sync: real S3 server, fake checkpoints written like a Trainer's.

    python -m pytest tests/test_checkpoint_sync.py -q -p tests.conftest_s3
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import s3fs
import torch
from safetensors.torch import save_file
from transformers import TrainerControl, TrainerState, TrainingArguments

from grpo_gsm8k.training.checkpoint_sync import (MANIFEST, CheckpointSync, ChecksumError, RemoteStore, RemoteUnavailable,
                                        build_manifest, fetch_checkpoint, latest_complete_checkpoint,
                                        local_checkpoints, resume_path, write_local_manifest)
from grpo_gsm8k.tools.s3server import pid_alive
from tests.conftest_s3 import fast_fail_options

FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
         "training_args.bin", "trainer_state.json")


def write_checkpoint(output_dir: Path, step: int) -> Path:
    """Files named and written the way Trainer._save_checkpoint writes them, trainer_state.json last."""
    ckpt = output_dir / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    generator = torch.Generator().manual_seed(step)
    save_file({"lora_A": torch.randn(16, 64, generator=generator)}, ckpt / "adapter_model.safetensors")
    (ckpt / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    torch.save({"state": {0: {"exp_avg": torch.randn(16, 64, generator=generator)}}}, ckpt / "optimizer.pt")
    torch.save({"last_epoch": step}, ckpt / "scheduler.pt")
    torch.save({"cpu": torch.random.get_rng_state()}, ckpt / "rng_state.pth")
    torch.save({"output_dir": str(output_dir)}, ckpt / "training_args.bin")
    TrainerState(global_step=step).save_to_json(str(ckpt / "trainer_state.json"))
    return ckpt


def digests(ckpt: Path) -> dict[str, str]:
    return {name: hashlib.sha256((ckpt / name).read_bytes()).hexdigest() for name in FILES}


class Run:
    """Drives a CheckpointSync the way Trainer calls it, without a model."""

    def __init__(self, output_dir: Path, sync: CheckpointSync):
        self.output_dir, self.sync = output_dir, sync
        self.args = TrainingArguments(output_dir=str(output_dir), report_to="none", save_total_limit=None)
        self.control = TrainerControl()

    def begin(self):
        self.sync.on_train_begin(self.args, TrainerState(), self.control)

    def save(self, step: int, world_zero: bool = True) -> float:
        write_checkpoint(self.output_dir, step)
        started = time.monotonic()
        self.sync.on_save(self.args, TrainerState(global_step=step, is_world_process_zero=world_zero), self.control)
        return time.monotonic() - started

    def end(self):
        self.sync.on_train_end(self.args, TrainerState(), self.control)


@pytest.fixture
def remote(shared_s3_server, tmp_path):
    return f"s3://{shared_s3_server.bucket}/checkpoints/{tmp_path.name}"  # tests share the server


@pytest.fixture
def options(shared_s3_server):
    return fast_fail_options(shared_s3_server)


def new_sync(output_dir, remote, options, **kw) -> CheckpointSync:
    kw = {"keep": 100, "backoff_initial": 0.1, "backoff_max": 0.3, "drain_timeout": 30, **kw}
    return CheckpointSync(output_dir, remote, options, **kw)


def remote_steps(options, remote) -> dict[int, set[str]]:
    fs = s3fs.S3FileSystem(**options)
    root = remote.removeprefix("s3://")
    found: dict[int, set[str]] = {}
    for key in fs.find(root):
        folder, name = key[len(root) + 1:].split("/", 1)
        found.setdefault(int(folder.removeprefix("checkpoint-")), set()).add(name)
    return found


def wait_for(condition, message: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


def test_on_save_uploads_every_file_and_a_matching_manifest(tmp_path, remote, options):
    out = tmp_path / "out"
    run = Run(out, new_sync(out, remote, options))
    run.begin()
    run.save(1)
    run.save(2)
    run.end()
    assert run.sync.uploaded == [1, 2]
    assert remote_steps(options, remote) == {1: {*FILES, MANIFEST}, 2: {*FILES, MANIFEST}}
    manifest = json.loads(s3fs.S3FileSystem(**options).cat(f"{remote}/checkpoint-2/{MANIFEST}"))
    assert {e["path"]: e["sha256"] for e in manifest["files"]} == digests(out / "checkpoint-2")
    assert json.loads((out / "checkpoint-2" / MANIFEST).read_text()) == manifest


def test_only_the_main_process_uploads(tmp_path, remote, options):
    out = tmp_path / "out"
    run = Run(out, new_sync(out, remote, options))
    run.save(1, world_zero=False)
    assert run.sync.wait_idle(5)
    assert remote_steps(options, remote) == {}
    assert not (out / "checkpoint-1" / MANIFEST).exists()


def test_truncated_remote_checkpoints_are_skipped(tmp_path, remote, options):
    out = tmp_path / "out"
    run = Run(out, new_sync(out, remote, options))
    for step in (1, 2, 3):
        run.save(step)
    run.end()
    shutil.rmtree(out)  # a fresh machine: only the remote counts
    fs = s3fs.S3FileSystem(**options)
    fs.rm(f"{remote}/checkpoint-3/{MANIFEST}")  # upload died before its manifest
    assert latest_complete_checkpoint(out, remote, options) == (f"{remote}/checkpoint-2", 2)
    optimizer = f"{remote}/checkpoint-2/optimizer.pt"
    fs.pipe(optimizer, fs.cat(optimizer)[:100])  # a file cut short
    assert latest_complete_checkpoint(out, remote, options) == (f"{remote}/checkpoint-1", 1)
    with pytest.raises(ChecksumError, match="optimizer.pt") as error:
        fetch_checkpoint(remote, 2, out, options)
    assert "\n" not in str(error.value)
    assert list(out.iterdir()) == []  # neither checkpoint-2 nor a partial download is left


def test_fetch_rejects_a_same_size_corrupted_file(tmp_path, remote, options):
    out = tmp_path / "out"
    run = Run(out, new_sync(out, remote, options))
    run.save(1)
    run.end()
    fs = s3fs.S3FileSystem(**options)
    scheduler = f"{remote}/checkpoint-1/scheduler.pt"
    original = fs.cat(scheduler)
    fs.pipe(scheduler, original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(ChecksumError, match="scheduler.pt.*sha256"):
        fetch_checkpoint(remote, 1, tmp_path / "fetched", options)


def test_what_a_kill_left_behind_is_neither_listed_nor_kept(tmp_path, remote, options):
    """kill -9 mid-write leaves a manifest's temp file (not a checkpoint file) and mid-fetch a hidden partial folder
    (named by the dead process's pid, so no later fetch would reuse or remove it)."""
    out = tmp_path / "out"
    run = Run(out, new_sync(out, remote, options))
    run.save(1)
    run.end()
    checkpoint = write_checkpoint(tmp_path / "other", 2)
    (checkpoint / f".{MANIFEST}.tmp").write_text("{")
    assert f".{MANIFEST}.tmp" not in {entry["path"] for entry in build_manifest(checkpoint, 2)["files"]}
    fetched = tmp_path / "fetched"
    dead = subprocess.Popen(["true"])
    dead.wait()
    (fetched / f".checkpoint-1.partial-{dead.pid}" / "optimizer.pt").parent.mkdir(parents=True)
    (fetched / f".checkpoint-1.partial-{dead.pid}" / "optimizer.pt").write_bytes(b"half")
    (fetched / f".checkpoint-1.partial-{os.getpid()}x").mkdir()  # not such a folder: left alone
    fetch_checkpoint(remote, 1, fetched, options)
    assert sorted(path.name for path in fetched.iterdir()) == [f".checkpoint-1.partial-{os.getpid()}x",
                                                               "checkpoint-1"]


@pytest.mark.parametrize("damage, reason", [
    ("no_trainer_state", "trainer_state.json"),  # killed mid-save: Trainer writes trainer_state.json last
    ("weights_cut", "adapter_model.safetensors"),
    ("optimizer_cut", "optimizer.pt"),
    ("manifest_mismatch", "optimizer.pt"),  # the manifest lists a size the file does not have
    ("bytes_flipped", "sha256"),  # same size, other bytes: only the manifest's hash tells
])
def test_damaged_local_checkpoint_is_reported_and_skipped(tmp_path, damage, reason, capfd):
    out = tmp_path / "out"
    write_checkpoint(out, 1)
    newest = write_checkpoint(out, 2)
    if damage == "no_trainer_state":
        (newest / "trainer_state.json").unlink()
    elif damage == "manifest_mismatch":
        (newest / MANIFEST).write_text(json.dumps(
            {"step": 2, "files": [{"path": "optimizer.pt", "size": 1, "sha256": "0" * 64}]}))
    elif damage == "bytes_flipped":
        write_local_manifest(newest, build_manifest(newest, 2))
        flip_last_byte(newest / "optimizer.pt")
    else:
        name = "adapter_model.safetensors" if damage == "weights_cut" else "optimizer.pt"
        data = (newest / name).read_bytes()
        (newest / name).write_bytes(data[: len(data) // 2])
    capfd.readouterr()
    assert latest_complete_checkpoint(out, None, None) == (str(out / "checkpoint-1"), 1)
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and str(newest) in lines[0] and reason in lines[0] and "skip" in lines[0], lines


def flip_last_byte(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))


@pytest.mark.parametrize("corrupt, local, expected", [
    ({3}, set(), 2),  # the newest one is bad: the one before it, fetched
    ({2, 3}, {1}, 1),  # every remote one newer than the local copy is bad: the local one
    ({1, 2, 3}, set(), None),  # none verifies: train from scratch
])
def test_corrupted_remote_checkpoints_are_reported_and_skipped(tmp_path, remote, options, capfd, corrupt, local,
                                                               expected):
    out = tmp_path / "out"
    run = Run(out, new_sync(out, remote, options))
    for step in (1, 2, 3):
        run.save(step)
    run.end()
    wanted = digests(out / f"checkpoint-{expected}") if expected else None
    fs = s3fs.S3FileSystem(**options)
    for step in corrupt:  # same size, other bytes: the listing cannot tell
        key = f"{remote}/checkpoint-{step}/optimizer.pt"
        data = fs.cat(key)
        fs.pipe(key, data[:-1] + bytes([data[-1] ^ 1]))
    for step in {1, 2, 3} - local:
        shutil.rmtree(out / f"checkpoint-{step}")
    capfd.readouterr()
    found = resume_path(out, remote, options)
    assert found == (str(out / f"checkpoint-{expected}") if expected else None)
    if expected:
        assert digests(out / f"checkpoint-{expected}") == wanted
    lines = capfd.readouterr().err.splitlines()
    skipped = sorted(corrupt - local)
    assert len(lines) == len(skipped), lines
    for step, line in zip(reversed(skipped), lines):  # newest first
        assert f"checkpoint-{step}" in line and "optimizer.pt" in line and "skip" in line, line
    assert sorted(p.name for p in out.iterdir()) == sorted(f"checkpoint-{s}" for s in local | {expected} - {None})
    # A rerun does not trip over them again, and the next upload of their step replaces them.
    assert not set(skipped) & set(RemoteStore(remote, options).complete_steps())


def test_server_down_mid_run_every_checkpoint_arrives_after_restart(s3_server, tmp_path):
    out, remote, options = tmp_path / "out", f"s3://{s3_server.bucket}/run", fast_fail_options(s3_server)
    run = Run(out, new_sync(out, remote, options, keep=1))
    run.save(1)
    assert run.sync.wait_idle(30)
    s3_server.stop()
    blocked = [run.save(2), run.save(3)]
    assert max(blocked) < 0.5, "on_save must not wait for the network"
    assert not run.sync.wait_idle(1), "nothing can be uploaded while the server is down"
    assert {1, 2, 3} <= set(p for p in range(1, 4) if (out / f"checkpoint-{p}").is_dir()), \
        "checkpoints not yet on the remote must never be pruned locally"
    with pytest.raises(RemoteUnavailable):
        latest_complete_checkpoint(out, remote, options)
    with pytest.raises(RemoteUnavailable):  # the server gone between the listing and the manifests' reads
        RemoteStore(remote, options).read_manifest(1)
    s3_server.start()
    run.save(4)
    run.end()
    assert run.sync.uploaded == [1, 2, 3, 4]
    assert set(remote_steps(options, remote)) == {4}  # keep=1 pruned the others after they arrived
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4"]


def test_server_down_then_back_keeps_all_checkpoints(s3_server, tmp_path):
    out, remote, options = tmp_path / "out", f"s3://{s3_server.bucket}/run", fast_fail_options(s3_server)
    run = Run(out, new_sync(out, remote, options))
    s3_server.stop()
    run.save(1)
    run.save(2)
    wait_for(lambda: run.sync.failed_attempts >= 2, "uploads never failed while the server was down")
    s3_server.start()
    run.save(3)
    run.end()
    steps = remote_steps(options, remote)
    assert steps == {step: {*FILES, MANIFEST} for step in (1, 2, 3)}


def killing_session(server, key_suffix: str):
    """An aiobotocore session whose S3 client kill -9s the real server right before it uploads `key_suffix`.

    The hook only picks the moment (deterministically, between two files of one upload); the failure that
    follows is the real one of a server that is gone.
    """
    from aiobotocore.session import AioSession

    session, killed = AioSession(), []

    def before_put(params, **_):
        if params["Key"].endswith(key_suffix) and not killed:
            pid = server.pid()
            os.killpg(pid, signal.SIGKILL)
            while pid_alive(pid):
                time.sleep(0.05)
            killed.append(params["Key"])

    session.register("before-parameter-build.s3.PutObject", before_put)
    return session, killed


def save_2_while_the_server_dies(s3_server, tmp_path, capfd):
    """Checkpoint-1 uploads whole; the server is killed on checkpoint-2's optimizer.pt (its first two files are up)."""
    out, remote, options = tmp_path / "out", f"s3://{s3_server.bucket}/run", fast_fail_options(s3_server)
    session, killed = killing_session(s3_server, "checkpoint-2/optimizer.pt")
    run = Run(out, new_sync(out, remote, {**options, "session": session}))
    run.save(1)
    assert run.sync.wait_idle(30)
    capfd.readouterr()
    run.save(2)
    return out, remote, options, run, killed


def upload_lines(capfd, step: int) -> list[str]:
    return [line for line in capfd.readouterr().err.splitlines() if f"checkpoint-{step}" in line]


def test_server_killed_mid_upload_then_back_the_checkpoint_arrives_whole(s3_server, tmp_path, capfd):
    out, remote, options, run, killed = save_2_while_the_server_dies(s3_server, tmp_path, capfd)
    wait_for(lambda: run.sync.failed_attempts >= 2, "the upload never failed after the server was killed")
    assert killed == ["run/checkpoint-2/optimizer.pt"]
    lines = upload_lines(capfd, 2)
    assert lines and all("upload" in line and str(out) in line and "retry" in line for line in lines), lines
    s3_server.start()
    run.end()
    assert run.sync.uploaded == [1, 2]
    assert remote_steps(options, remote) == {1: {*FILES, MANIFEST}, 2: {*FILES, MANIFEST}}
    expected = digests(out / "checkpoint-2")
    fetched = fetch_checkpoint(remote, 2, tmp_path / "fresh", options)  # verifies every hash
    assert digests(fetched) == expected


def test_process_dies_while_the_server_is_down_mid_upload_next_run_resumes(s3_server, tmp_path, capfd):
    out, remote, options, run, killed = save_2_while_the_server_dies(s3_server, tmp_path, capfd)
    wait_for(lambda: run.sync.failed_attempts >= 1, "the upload never failed after the server was killed")
    run.sync.close()  # the training process dies before the server is back
    lines = upload_lines(capfd, 2)
    assert lines and all(str(out) in line for line in lines), lines  # says where the checkpoint stays
    s3_server.start()
    # On the server: checkpoint-2 half there, without its manifest; a fresh machine takes checkpoint-1.
    assert remote_steps(options, remote)[2] == {"adapter_config.json", "adapter_model.safetensors"}
    assert latest_complete_checkpoint(tmp_path / "fresh", remote, options) == (f"{remote}/checkpoint-1", 1)
    # This machine's next run resumes from its local checkpoint-2 and uploads it whole first.
    assert latest_complete_checkpoint(out, remote, options) == (str(out / "checkpoint-2"), 2)
    again = Run(out, new_sync(out, remote, options))
    again.begin()
    assert again.sync.wait_idle(30)
    again.end()
    assert again.sync.uploaded == [2]
    assert remote_steps(options, remote) == {1: {*FILES, MANIFEST}, 2: {*FILES, MANIFEST}}


def test_max_retries_parks_the_uploader_until_the_next_save(tmp_path, options):
    with socket.socket() as probe:  # a port nobody listens on: every request is refused
        probe.bind(("127.0.0.1", 0))
        dead_endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    out = tmp_path / "out"
    run = Run(out, new_sync(out, "s3://nowhere/run", {**options, "endpoint_url": dead_endpoint}, max_retries=2))
    run.save(1)
    wait_for(lambda: run.sync.failed_attempts == 2, "the uploader never failed")
    time.sleep(1.0)
    assert run.sync.failed_attempts == 2, "parked: no retry before the next save"
    run.save(2)
    wait_for(lambda: run.sync.failed_attempts > 2, "a new save did not retry the backlog")
    run.sync.close()


def test_pruning_keeps_newest_and_protected_on_both_sides(tmp_path, remote, options):
    out = tmp_path / "out"
    run = Run(out, new_sync(out, remote, options, keep=2, protect_steps={2}))
    for step in range(1, 6):
        run.save(step)
        assert run.sync.wait_idle(30)
    run.end()
    assert set(remote_steps(options, remote)) == {2, 4, 5}
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]


def test_local_checkpoints_missing_on_the_remote_are_never_pruned(tmp_path, remote, options):
    out = tmp_path / "out"
    offline = Run(out, new_sync(out, None, None))  # an earlier run without a remote
    offline.save(1)
    offline.end()
    run = Run(out, new_sync(out, remote, options, keep=1))
    run.save(2)
    run.end()
    assert set(remote_steps(options, remote)) == {2}
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2"]  # 1's only copy


def test_local_only_mode_writes_manifests_and_prunes(tmp_path):
    out = tmp_path / "out"
    run = Run(out, new_sync(out, None, None, keep=1, protect_steps={1}))
    for step in range(1, 4):
        run.save(step)
    run.end()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-3"]
    assert (out / "checkpoint-3" / MANIFEST).is_file()


def test_a_new_run_uploads_what_the_previous_one_left_behind(tmp_path, remote, options):
    out = tmp_path / "out"
    first = Run(out, new_sync(out, remote, options))
    first.save(1)
    first.end()
    write_checkpoint(out, 2)  # saved, then the process died before uploading it
    second = Run(out, new_sync(out, remote, options))
    second.begin()
    assert second.sync.wait_idle(30)
    assert second.sync.uploaded == [2]  # checkpoint-1 was already complete on the remote
    assert set(remote_steps(options, remote)) == {1, 2}


def test_a_damaged_local_checkpoint_is_neither_uploaded_nor_counted_by_pruning(tmp_path, remote, options, capfd):
    """Same size, other bytes: the resume skipped it, so it must not reach S3 under a manifest that vouches for
    other bytes, nor make the newest-`keep` count prune the good checkpoint the run resumed from."""
    out = tmp_path / "out"
    first = Run(out, new_sync(out, remote, options, keep=1))
    first.save(1)
    first.end()
    damaged = write_checkpoint(out, 2)
    write_local_manifest(damaged, build_manifest(damaged, 2))
    flip_last_byte(damaged / "optimizer.pt")
    capfd.readouterr()
    second = Run(out, new_sync(out, remote, options, keep=1))
    second.begin()
    second.end()
    assert second.sync.uploaded == [] and set(remote_steps(options, remote)) == {1}
    assert sorted(local_checkpoints(out)) == [1, 2]  # the good one kept; the damaged one left for training to redo
    lines = [line for line in capfd.readouterr().err.splitlines() if "checkpoint-2" in line]
    assert len(lines) == 1 and "sha256" in lines[0] and "not uploading" in lines[0], lines


def test_resume_path_fetches_from_s3_when_local_is_gone_or_older(tmp_path, remote, options):
    out = tmp_path / "out"
    run = Run(out, new_sync(out, remote, options))
    run.save(1)
    run.save(2)
    run.end()
    expected = digests(out / "checkpoint-2")
    assert resume_path(out, remote, options) == str(out / "checkpoint-2")  # local and up to date

    shutil.rmtree(out / "checkpoint-2")  # local copy older than the remote
    assert resume_path(out, remote, options) == str(out / "checkpoint-2")
    assert digests(out / "checkpoint-2") == expected

    shutil.rmtree(out)  # fresh machine
    assert resume_path(out, remote, options) == str(out / "checkpoint-2")
    assert digests(out / "checkpoint-2") == expected
    assert [p.name for p in out.iterdir()] == ["checkpoint-2"]  # no partial download left


def test_resume_path_is_none_when_there_is_no_checkpoint(tmp_path, remote, options):
    assert resume_path(tmp_path / "out", remote, options) is None


class TinyLM(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = torch.arange(i % 50, i % 50 + 8)
        return {"input_ids": ids, "labels": ids}


def tiny_trainer(out: Path, sync: CheckpointSync, max_steps: int):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=16)
    lora = LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")  # GPT-2's Conv1D
    model = get_peft_model(GPT2LMHeadModel(config), lora)
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, save_steps=2, save_total_limit=None,
                             per_device_train_batch_size=4, learning_rate=1e-2, lr_scheduler_type="constant",
                             report_to="none", use_cpu=True, seed=0, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=TinyLM(), callbacks=[sync])


def lora_weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if "lora" in k}


def test_real_trainer_resumed_from_s3_matches_an_uninterrupted_run(tmp_path, remote, options):
    out = tmp_path / "out"
    sync = new_sync(out, remote, options, keep=2)
    tiny_trainer(out, sync, max_steps=4).train()
    assert sync.uploaded == [2, 4]
    shutil.rmtree(out)  # the machine is gone; a new one resumes from S3 and trains on
    start_from = resume_path(out, remote, options)
    assert start_from == str(out / "checkpoint-4")
    resumed = tiny_trainer(out, new_sync(out, remote, options, keep=2), max_steps=6)
    resumed.train(resume_from_checkpoint=start_from)

    reference = tiny_trainer(tmp_path / "ref", new_sync(tmp_path / "ref", None, None), max_steps=6)
    reference.train()
    assert resumed.state.global_step == 6
    after, expected = lora_weights(resumed), lora_weights(reference)
    assert all(torch.equal(after[k], expected[k]) for k in expected)
