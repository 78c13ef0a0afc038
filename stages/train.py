"""Train stage: GRPO (TRL `GRPOTrainer`) with LoRA adapters (peft) on the GSM8K training prompts.

    python -m stages.train --model models/base --data data/prepared/train.jsonl \
        --validation data/prepared/validation.jsonl --checkpoints models/checkpoints --live results/train/live \
        --summary results/train/summary.json

One reward function per reward of the chosen `reward.variant`, so TRL (and dvclive) log each. A checkpoint every
`train.save_steps` goes to `checkpoint_remote` in the background (grpo_gsm8k.training.checkpoint_sync); rerunning after a
crash resumes from the newest complete checkpoint, local or on S3, at the same step and data order. Checkpoints
belong to a run id, a hash of everything that shapes training, so changed params never resume a stale run.
Every `train.eval_steps` the current adapter answers the held-out validation questions
(grpo_gsm8k.training.validation), logged beside the training curves for the select stage's validation rule.
With `train.num_processes` > 1 the stage relaunches itself under `accelerate launch`.
Departures from the study: none in the objective; the rollout engine may be grpo_gsm8k.fastgen.generator (same sampling).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from accelerate import PartialState
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from grpo_gsm8k.contracts import read_curves, read_metric
from grpo_gsm8k.fastgen.rollout import make_rollout_func
from grpo_gsm8k.generation import answer_set
from grpo_gsm8k.io import fail, read_jsonl, write_json
from grpo_gsm8k.modeling import DTYPES, load_tokenizer, model_location, pick_device
from grpo_gsm8k.params import Params, load_params
from grpo_gsm8k.science.learning_signal import no_signal_warning, signal_summary
from grpo_gsm8k.science.rewards import build_reward_funcs
from grpo_gsm8k.training.checkpoint_sync import CheckpointSync, RemoteRefused, RemoteUnavailable, resume_path
from grpo_gsm8k.training.compile_cache import FirstStepClock, share_through_remote, start_compile_workers
from grpo_gsm8k.training.diagnostics import UpdateNormLogger
from grpo_gsm8k.training.live_log import LiveLogger, log_history, restore_curves
from grpo_gsm8k.training.speedups import fast_training_overrides, speed_up_training, will_compile
from grpo_gsm8k.training.trackers import tracker_names
from grpo_gsm8k.training.validation import ValidationPass

RUN_FILE = "run.json"


def run_identity(params: Params, model_dir: Path, data_path: Path) -> dict:
    """Everything that shapes the trained weights; bookkeeping params (saving, logging, validating, pruning,
    compiling) are left out, so changing them resumes the same run."""
    shaping = dataclasses.asdict(params.train)
    for bookkeeping in ("save_steps", "logging_steps", "eval_steps", "keep_checkpoints", "checkpoint_remote",
                        "accelerate_config", "compile", "report_to"):
        shaping.pop(bookkeeping)
    identity = {"seed": params.seed, "train": shaping, "reward": dataclasses.asdict(params.reward),
                "engine": params.generation.engine, "model": _digest_base_model(model_dir),
                "data": hashlib.sha256(data_path.read_bytes()).hexdigest()}
    identity["run_id"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return identity


SMALL_FILE = 1 << 20  # read whole: pointers and records (source.json, origin.json), configs, tokenizers


def _digest_base_model(folder: Path) -> str:
    """Names and sizes of models/base's files, and the contents of the small ones. Weights are not read (16 GB),
    but the small files change with them: a hub pointer's commit, a local folder's fingerprint, a GGUF's sha256."""
    entries = sorted((p.name, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()
                      if p.stat().st_size <= SMALL_FILE else None) for p in folder.iterdir() if p.is_file())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def claim_run(checkpoints: Path, live_dir: Path, identity: dict) -> bool:
    """Keep the folders if they belong to this run (a resume); clear them if they hold another run's state.

    run.json is written either way, so a folder that cannot be written fails here, before any training."""
    run_file = checkpoints / RUN_FILE
    resuming = run_file.is_file() and json.loads(run_file.read_text()).get("run_id") == identity["run_id"]
    try:
        if not resuming:
            if checkpoints.exists() and any(checkpoints.iterdir()):
                print(f"train: {checkpoints} holds another run's checkpoints (params changed); starting a new run")
            for folder in (checkpoints, live_dir):
                if folder.exists():
                    shutil.rmtree(folder)
        checkpoints.mkdir(parents=True, exist_ok=True)
        write_json(run_file, identity)
    except OSError as err:
        folder = live_dir if str(err.filename or "").startswith(str(live_dir)) else checkpoints
        raise ValueError(f"{folder} is not writable ({err.strerror}: {err.filename}); fix its permissions or "
                         "mount (e.g. chattr -i, a read-only mount) or pass the stage another folder") from None
    return resuming


def grpo_config(params: Params, checkpoints: Path, device: str):
    train = params.train
    choice = train.gradient_checkpointing
    # "auto" recomputes activations only on a GPU too small to keep them (see fast_training_overrides).
    speed = fast_training_overrides(gradient_checkpointing=None if choice == "auto" else choice)
    return GRPOConfig(
        output_dir=str(checkpoints), seed=params.seed, data_seed=params.seed, report_to=tracker_names(train.report_to),
        learning_rate=train.learning_rate, lr_scheduler_type=train.lr_scheduler_type,
        warmup_steps=train.warmup_steps, max_steps=train.max_steps,
        per_device_train_batch_size=train.per_device_train_batch_size,
        # The study's batch shape is per optimizer step: N processes each accumulate 1/N of it.
        gradient_accumulation_steps=train.gradient_accumulation_steps // train.num_processes,
        num_generations=train.num_generations,
        max_completion_length=train.max_completion_length, temperature=train.temperature, beta=train.beta,
        loss_type=train.loss_type, mask_truncated_completions=train.mask_truncated_completions,
        save_strategy="steps", save_steps=train.save_steps, save_total_limit=None,  # CheckpointSync prunes
        logging_steps=train.logging_steps, bf16=device == "cuda" and params.model.dtype == "bfloat16",
        fp16=device == "cuda" and params.model.dtype == "float16", use_cpu=device == "cpu",
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient; the search costs a graph pass
        **speed,
    )


def protected_steps(params: Params) -> set[int]:
    """Checkpoints never pruned: the one select.step names, so select can always find it (the validation pass adds
    its rule's step as training goes)."""
    return {params.select.step}


def unsaved_select_step(params: Params) -> str | None:
    """Why select.step will have no checkpoint for select.rule=step, or None: a warning before hours of training
    (the select stage fails on it after them; checkpoints are saved every save_steps and at max_steps)."""
    step, train = params.select.step, params.train
    if params.select.rule != "step" or (step <= train.max_steps and (step % train.save_steps == 0
                                                                      or step == train.max_steps)):
        return None
    return (f"select.step={step} will have no checkpoint (train.max_steps={train.max_steps}, train.save_steps="
            f"{train.save_steps}), so the select stage will fail; pick a saved step, e.g. select.step="
            f"{min(train.max_steps, step // train.save_steps * train.save_steps or train.save_steps)}")


def validation_pass(params: Params, validation_path: Path | None, model_dir: Path,
                    sync: CheckpointSync) -> ValidationPass:
    """None for validation_path runs no pass (library callers and tests that train a few steps); the stage always
    passes the data stage's file."""
    rows = read_jsonl(validation_path) if validation_path and validation_path.is_file() else []
    if validation_path and params.data.validation_questions and not rows:
        raise ValueError(f"{validation_path} is missing or empty but data.validation_questions="
                         f"{params.data.validation_questions}; rerun the data stage (dvc repro data)")
    tokenizer = load_tokenizer(model_dir) if rows else None  # a finished run may resume with no model at hand
    greedy = dataclasses.replace(params.generation, temperature=0.0)  # one answer each, no sampling noise

    def answer(model, rows: list[dict], desc: str) -> list[dict]:
        return answer_set(model, tokenizer, rows, 1, greedy, params.seed, desc)

    return ValidationPass(rows, answer, params.reward, every=params.train.eval_steps,
                          window=params.select.validation_window, protected_steps=sync.protect_steps)


def build_trainer(params: Params, model_dir: Path, data_path: Path, checkpoints: Path, callbacks: list,
                  reward_funcs: list | None = None):
    """The GRPOTrainer the stage runs; `reward_funcs` replaces the params' variant (tests use it)."""
    device = pick_device(params.model.device)
    location, revision = model_location(model_dir)
    dtype = DTYPES[params.model.dtype] if device == "cuda" else DTYPES["float32"]
    model = AutoModelForCausalLM.from_pretrained(location, revision=revision, dtype=dtype)
    tokenizer = load_tokenizer(model_dir)
    rows = read_jsonl(data_path)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"], "qid": r["qid"]} for r in rows])
    lora = params.train.lora
    rollout = {}
    if params.generation.engine == "fast":
        rollout = {"rollout_func": make_rollout_func(params)}
    return GRPOTrainer(
        model=model, processing_class=tokenizer, args=grpo_config(params, checkpoints, device),
        reward_funcs=reward_funcs or build_reward_funcs(params.reward),
        train_dataset=dataset, callbacks=callbacks, **rollout,
        peft_config=LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                               target_modules=lora.target_modules, task_type="CAUSAL_LM"),
    )


def run(params: Params, model_dir: Path, data_path: Path, checkpoints: Path, live_dir: Path,
        summary_path: Path, validation_path: Path | None = None) -> dict:
    identity = run_identity(params, model_dir, data_path)
    if problem := unsaved_select_step(params):
        print(f"warning: {problem}", file=sys.stderr, flush=True)
    # First use of accelerate's process state: it must know about CPU now, or it never opens the gloo group.
    state = PartialState(cpu=pick_device(params.model.device) == "cpu")
    remote = f"{params.train.checkpoint_remote.rstrip('/')}/{identity['run_id']}" \
        if params.train.checkpoint_remote else None
    with state.main_process_first():  # the main process claims the folder and fetches; the others then read it
        resuming = claim_run(checkpoints, live_dir, identity) if state.is_main_process else True
        try:
            start_from = resume_path(checkpoints, remote) if resuming or remote else None
        except RemoteRefused as err:
            raise ValueError(f"train.checkpoint_remote={params.train.checkpoint_remote!r} refused our credentials "
                             f"({err}); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or set "
                             "train.checkpoint_remote=\"\"") from None
        except RemoteUnavailable as err:
            raise ValueError(f"train.checkpoint_remote={params.train.checkpoint_remote!r} is unreachable ({err}); "
                             "start the server (python -m grpo_gsm8k.tools.s3server start) or set "
                             "train.checkpoint_remote=\"\"") from None
    resumed_step = int(start_from.rsplit("-", 1)[1]) if start_from else 0
    sync = CheckpointSync(checkpoints, remote, keep=params.train.keep_checkpoints,
                          protect_steps=protected_steps(params))
    validation = validation_pass(params, validation_path, model_dir, sync)
    if start_from:  # before anything uploads or prunes: the rule's checkpoint so far is kept from the start
        validation.resume(log_history(Path(start_from)))
    first_step = FirstStepClock()
    train_seconds = None
    if resumed_step >= params.train.max_steps:
        # Trainer would take one more step before checking max_steps; the run is already complete.
        print(f"train: run {identity['run_id']} is complete at step {resumed_step}; nothing to train")
        if state.is_main_process:  # e.g. fetched onto a fresh machine: its curves come with the checkpoint
            restore_curves(live_dir, Path(start_from))
            sync.upload_leftovers()  # e.g. the last uploads of the run failed (S3 was down)
            sync.finish()
        global_step = resumed_step
    else:
        choice = None if params.train.compile == "auto" else params.train.compile
        cuda = pick_device(params.model.device) == "cuda"
        if cuda and will_compile(choice, cuda):  # the workers build and load Triton (GPU) kernels
            start_compile_workers()  # in the background while the model loads
        # The norm joins the logs first; validation logs through the LiveLogger, so it comes after it.
        trainer = build_trainer(params, model_dir, data_path, checkpoints,
                                [UpdateNormLogger(), LiveLogger(live_dir), sync, validation, first_step])
        validation.attach(trainer)
        if start_from:
            print(f"train: resuming run {identity['run_id']} from {start_from} (step {resumed_step})")
        speedups = speed_up_training(trainer, compile_layers=choice)
        print("train:", speedups)
        if remote and speedups["compiled_layers"]:  # a fresh machine gets the compiled graphs with the checkpoints
            share_through_remote(remote, first_step, upload=state.is_main_process)
        train_seconds = trainer.train(resume_from_checkpoint=start_from).metrics.get("train_runtime")
        global_step = trainer.state.global_step
    summary = {"run_id": identity["run_id"], "global_step": global_step, "resumed_from_step": resumed_step,
               "uploaded_steps": sorted(sync.uploaded), "remote": remote or "", **curve_summary(live_dir),
               **signal_summary(read_curves(live_dir)), "validation": validation.summary(train_seconds),
               "first_step": first_step.report}
    if state.is_main_process:
        write_json(summary_path, summary)
        if warning := no_signal_warning(summary):
            print(warning)
    return summary


def curve_summary(live_dir: Path) -> dict:
    """Headline numbers of the whole logged run (resumes included), for `dvc metrics show` / `dvc exp show`."""
    loss, reward = read_metric(live_dir, "loss"), read_metric(live_dir, "reward")
    return {"mean_loss": sum(v for _, v in loss) / len(loss) if loss else None,
            "final_reward": reward[-1][1] if reward else None,
            "mean_reward": sum(v for _, v in reward) / len(reward) if reward else None}


def relaunch_under_accelerate(params: Params, argv: list[str]) -> int:
    """Run this stage again as `num_processes` workers; each accumulates 1/N of the steps (same batch per step)."""
    config = Path(params.train.accelerate_config)
    if not config.is_file():
        beside = ", ".join(sorted(str(p) for p in config.parent.glob("*.yaml"))) if config.parent.is_dir() else ""
        raise ValueError(f"train.accelerate_config={str(config)!r} is not a file; name an accelerate config file"
                         + (f", e.g. one of: {beside}" if beside else ""))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", params.train.accelerate_config,
               "--main_process_port", os.environ.get("GRPO_GSM8K_PORT", "29517"),
               "--num_processes", str(params.train.num_processes), "-m", "stages.train", *argv]
    return subprocess.call(command, env={**os.environ, "GRPO_GSM8K_LAUNCHED": "1"})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--validation", type=Path, required=True, help="held-out questions (data stage)")
    parser.add_argument("--checkpoints", type=Path, required=True)
    parser.add_argument("--live", type=Path, required=True)
    parser.add_argument("--summary", type=Path, required=True)
    args = parser.parse_args(argv)
    with fail():
        params = load_params(args.params)
        tracker_names(params.train.report_to)  # a missing tracker fails now, not after the model has loaded
        if params.train.num_processes > 1 and not os.environ.get("GRPO_GSM8K_LAUNCHED"):
            raise SystemExit(relaunch_under_accelerate(params, argv))
        summary = run(params, args.model, args.data, args.checkpoints, args.live, args.summary, args.validation)
    print("train:", json.dumps(summary))


if __name__ == "__main__":
    main()
