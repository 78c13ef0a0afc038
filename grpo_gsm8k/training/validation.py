"""The validation pass: greedy answers to the held-out train questions every `train.eval_steps` steps.

Before the first step (the base model's point) and at every multiple of eval_steps, the current adapter answers
`data/prepared/validation.jsonl` once each at temperature 0, through the same engine and grader as the evaluate
stage (the train stage hands in grpo_gsm8k/generation.py's answer_set set to greedy, which grades too).
Accuracy, full-format rate, mean reward, mean length and the pass's seconds are logged as validation/* through
Trainer.log, so dvclive (and any train.report_to tracker) draws them beside the training curves, and
trainer_state.json carries them through a resume.
The pass runs under a forked RNG: training draws the same random numbers with validation on or off.
The step the validation rule points to so far (science/selection.py) is kept from pruning, so select can use it.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from transformers import Trainer, TrainerCallback

from grpo_gsm8k.science.rewards import RewardKnobs, total_reward
from grpo_gsm8k.science.selection import (VALIDATION_ACCURACY, VALIDATION_PREFIX, best_validation_step,
                                          validation_metrics)

SECONDS = f"{VALIDATION_PREFIX}seconds"


class ValidationPass(TrainerCallback):
    def __init__(self, rows: list[dict], answer: Callable, knobs: RewardKnobs, every: int, window: int,
                 protected_steps: set[int]):
        """answer(model, rows, desc) -> one graded greedy record per row (generation.answer_set); protected_steps:
        the set CheckpointSync never prunes, to which the rule's current step is added."""
        self.rows, self.answer, self.every, self.window = rows, answer, every, window
        self.knobs, self.protected_steps = knobs, protected_steps
        self.fixed_steps = set(protected_steps)
        self.trainer: Trainer | None = None  # set by attach(); Trainer.log writes the curves
        self.curve: list[tuple[int, float]] = []
        self.seconds = 0.0  # this process's passes; earlier ones (before a resume) are counted apart
        self.passes = 0
        self.earlier_seconds, self.earlier_passes = 0.0, 0

    def attach(self, trainer) -> ValidationPass:
        self.trainer = trainer
        return self

    def resume(self, log_history: list[dict]) -> None:
        """Take up the run's earlier points (a resume, or a finished run's rerun, which trains nothing but still
        prunes): its best checkpoint so far must survive the next pruning too."""
        earlier = [entry for entry in log_history if VALIDATION_ACCURACY in entry]
        self.curve = [(entry["step"], entry[VALIDATION_ACCURACY]) for entry in earlier]
        self.earlier_passes, self.earlier_seconds = len(earlier), sum(entry.get(SECONDS, 0.0) for entry in earlier)
        self._protect_rule_step()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # A resumed run brings its earlier points in log_history; a new run validates the base model first.
        self.resume(state.log_history)
        if state.global_step == 0 and self.rows:
            self._validate(model, state, control)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.rows and state.global_step % self.every == 0:
            self._validate(model, state, control)  # before the step's checkpoint is saved, so it carries this point

    def _validate(self, model, state, control) -> None:
        if not state.is_world_process_zero:  # one process answers; the others wait at their next collective
            return
        started = time.perf_counter()
        was_training = model.training
        model.eval()  # LoRA dropout off
        cuda = [model.device] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            graded = self.answer(model, self.rows, f"validation at step {state.global_step}")
        model.train(was_training)
        records = [{**r, "reward": total_reward(r["completion"], r["gold"], r["n_tokens"], self.knobs)} for r in graded]
        metrics = validation_metrics(records)
        elapsed = time.perf_counter() - started
        self.seconds += elapsed
        self.passes += 1
        self.curve.append((state.global_step, metrics[VALIDATION_ACCURACY]))
        # Trainer.log, not GRPOTrainer.log: TRL's override would flush its half-accumulated training metrics. Any
        # log call clears control.should_log, which would drop this step's training log: keep it as it was.
        training_log_due = control.should_log
        Trainer.log(self.trainer, {**metrics, SECONDS: elapsed})
        control.should_log = training_log_due
        best = self._protect_rule_step()
        print(f"validation: step {state.global_step}: accuracy {metrics[VALIDATION_ACCURACY]:.3f} on "
              f"{len(records)} held-out questions ({elapsed:.1f} s); rule's step so far: {best}", flush=True)

    def _protect_rule_step(self) -> int | None:
        """Keep the validation rule's current step from pruning (and release the one it pointed to before).
        The uploader thread reads the set while this runs: the new step goes in before the old one comes out, so
        no read ever lacks a step that must be kept."""
        best = self.rule_step()
        if best is not None:
            self.protected_steps.add(best)
        for released in self.protected_steps - self.fixed_steps - {best}:
            self.protected_steps.discard(released)
        return best

    def summary(self, train_seconds: float | None) -> dict:
        """The validation figures the train summary reports: the run's passes and their seconds (earlier processes'
        included), and their share of the training time this process measured (None where it trained nothing)."""
        return {"questions": len(self.rows), "passes": self.earlier_passes + self.passes,
                "seconds": round(self.earlier_seconds + self.seconds, 3),
                "share_of_training_time": self.seconds / train_seconds if train_seconds else None,
                "rule_step": self.rule_step()}

    def rule_step(self) -> int | None:
        """The validation rule's step among the validated ones so far (each is saved: eval_steps % save_steps)."""
        return best_validation_step(self.curve, [step for step, _ in self.curve], self.window)
