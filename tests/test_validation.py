"""Validation during training (issue 15 §1): the held-out slice, the validation rule, and a real TRL run that logs
the curve, keeps the rule's checkpoint from pruning and trains exactly as it would without validation.

    python -m pytest tests/test_validation.py -q
"""
from __future__ import annotations

import dataclasses
import json

import pytest
from safetensors.torch import load_file

from grpo_gsm8k import contracts
from grpo_gsm8k.io import read_jsonl, write_jsonl
from grpo_gsm8k.modeling import prepare_base
from grpo_gsm8k.params import ParamsError, load_params
from grpo_gsm8k.science.selection import best_validation_step, validation_metrics, value_at
from stages import data, select, train
from tests.conftest import cpu_params_dict, write_params
from tests.test_resume import MOVED, distance_from_init, max_difference
from tests.test_stages import tiny_params


@pytest.mark.parametrize("curve, saved, window, expected", [
    ([(0, 0.1), (2, 0.3), (4, 0.5), (6, 0.2)], [2, 4, 6], 1, 4),          # the raw peak
    ([(0, 0.1), (2, 0.5), (4, 0.5), (6, 0.2)], [2, 4, 6], 1, 2),          # a tie goes to the earlier step
    ([(0, 0.9), (2, 0.0), (4, 0.0)], [2, 4], 1, 2),                       # step 0 (no adapter) is never chosen
    ([(0, 0.9), (2, 0.0)], [0, 2], 1, 2),                                 # not even where listed (the train stage)
    ([(2, 0.2), (4, 0.8), (6, 0.1), (8, 0.6), (10, 0.6)], [2, 4, 6, 8, 10], 2, 10),  # 0.2, .5, .45, .35, .6
    ([(0, 1.0), (2, 0.0), (4, 0.2)], [2, 4], 2, 4),                       # the base point is in no average
    ([(0, 0.0), (2, 0.3), (4, 0.6)], [2], 1, 2),                          # only saved steps are candidates
    ([(4, 0.6), (0, 0.0), (2, 0.3)], [2, 4], 1, 4),                       # logged out of order: sorted by step
    ([], [2, 4], 3, None),                                                # validation off: no rule
    ([(0, 0.5)], [], 1, None),                                            # nothing saved: no rule
])
def test_validation_rule(curve, saved, window, expected):
    assert best_validation_step(curve, saved, window) == expected


def test_validation_metrics_and_values_at_steps():
    records = [{"completion": "so\n#### 5", "correct": True, "n_tokens": 10, "reward": 6.5},
               {"completion": "#### 5 apples", "correct": False, "n_tokens": 30, "reward": 0.5}]
    assert validation_metrics(records) == {"validation/accuracy": 0.5, "validation/full_format_rate": 0.5,
                                           "validation/mean_reward": 3.5, "validation/mean_tokens": 20.0}
    assert value_at([(0, 0.1), (4, 0.3)], 4) == 0.3 and value_at([(0, 0.1)], 4) is None


def write_split(folder, questions: list[str]) -> None:
    rows = [{"question": q, "answer": f"steps\n#### {i}"} for i, q in enumerate(questions)]
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "test.jsonl", rows[:3])


def test_validation_questions_are_never_training_prompts(tmp_path):
    """Drawn first from the train split; a training row with the same question text (GSM8K-style duplicates,
    up to spacing and case) leaves the pool too; training takes all of what remains."""
    questions = [f"How many apples does person {i} have?" for i in range(40)]
    questions += [f"  how many APPLES does person {i}   have?" for i in range(10)]  # duplicates of rows 0-9
    write_split(tmp_path / "gsm8k", questions)
    params = load_params(write_params(tmp_path / "p.yaml", cpu_params_dict(**{
        "data.source": str(tmp_path / "gsm8k"), "data.train_questions": "all", "data.validation_questions": 12,
        "evaluation.sets.study.questions": 2, "evaluation.sets.test.questions": 2})))
    counts = data.run(params.data, params.evaluation, params.seed, tmp_path / "prepared")
    held_out = read_jsonl(tmp_path / "prepared" / contracts.VALIDATION_PROMPTS)
    trained = read_jsonl(tmp_path / "prepared" / contracts.TRAIN_PROMPTS)
    key = data.question_key
    assert len(held_out) == counts["validation"] == 12
    assert not {r["qid"] for r in held_out} & {r["qid"] for r in trained}
    assert not {key(r["question"]) for r in held_out} & {key(r["question"]) for r in trained}
    assert any(r["qid"] < 10 or r["qid"] >= 40 for r in held_out)  # the draw holds a question with a twin
    held_keys = {key(r["question"]) for r in held_out}
    assert sorted(r["qid"] for r in trained) == [i for i, q in enumerate(questions) if key(q) not in held_keys]
    assert len(trained) == counts["train"]
    assert held_out[0]["prompt"][0]["content"] == params.data.system_prompt  # the same prompt as training


def test_no_validation_keeps_the_training_draw(tmp_path):
    """data.validation_questions: 0 draws the same training prompts as before validation existed."""
    settings = {"data.train_questions": 30, "evaluation.sets.study.questions": 2, "evaluation.sets.test.questions": 2}
    params = load_params(write_params(tmp_path / "p.yaml", cpu_params_dict(**settings,
                                                                           **{"data.validation_questions": 0})))
    data.run(params.data, params.evaluation, params.seed, tmp_path / "prepared")
    import random

    expected = random.Random(f"{params.seed}-train").sample(range(7473), 30)
    assert [r["qid"] for r in read_jsonl(tmp_path / "prepared" / contracts.TRAIN_PROMPTS)] == expected
    assert read_jsonl(tmp_path / "prepared" / contracts.VALIDATION_PROMPTS) == []


@pytest.mark.parametrize("settings, message", [
    ({"train.save_steps": 4, "train.eval_steps": 6}, "train.eval_steps=6 must be a multiple of train.save_steps=4"),
    ({"data.validation_questions": 0, "select.rule": "validation"}, "select.rule=validation needs validation"),
    ({"select.rule": "best"}, "select.rule"),
    ({"data.validation_questions": -1}, "data.validation_questions=-1 must be >= 0"),
])
def test_validation_params_name_the_bad_key(tmp_path, settings, message):
    with pytest.raises(ParamsError, match=message):
        load_params(write_params(tmp_path / "p.yaml", cpu_params_dict(**settings)))


@pytest.mark.slow
def test_validation_pass_during_real_training(tmp_path, tiny_model_dir):
    """Two TRL steps validating at 0, 1 and 2: the curve in dvclive and in the checkpoints' log, the rule's
    checkpoint kept although keep_checkpoints is 1, select.rule=validation picks it, and the adapter equals that
    of the same run without validation (the pass never touches training's random numbers)."""
    params = tiny_params(tmp_path, tiny_model_dir, **{"data.validation_questions": 4, "train.eval_steps": 1,
                                                      "train.keep_checkpoints": 1})
    data.run(params.data, params.evaluation, params.seed, tmp_path / "prepared")
    prepare_base(str(tiny_model_dir), "main", tmp_path / "base")
    prompts = tmp_path / "prepared" / contracts.TRAIN_PROMPTS
    summary = train.run(params, tmp_path / "base", prompts, tmp_path / "ckpt", tmp_path / "live",
                        tmp_path / "summary.json", tmp_path / "prepared" / contracts.VALIDATION_PROMPTS)

    curve = contracts.read_metric(tmp_path / "live", "validation/accuracy")
    assert [step for step, _ in curve] == [0, 1, 2]
    assert [s for s, _ in contracts.read_metric(tmp_path / "live", "validation/full_format_rate")] == [0, 1, 2]
    assert [s for s, _ in contracts.read_metric(tmp_path / "live", "loss")] == [1, 2]  # training's own log intact
    validation = summary["validation"]
    assert validation["questions"] == 4 and validation["passes"] == 3 and 0 < validation["share_of_training_time"] < 1
    state = json.loads((tmp_path / "ckpt" / "checkpoint-2" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "validation/accuracy" in e] == [0, 1, 2]  # resumes keep it

    rule_step = best_validation_step(curve, [1, 2], params.select.validation_window)
    assert validation["rule_step"] == rule_step
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "ckpt").glob("checkpoint-*"))
    assert saved == sorted({rule_step, 2})  # keep 1 = the newest; the rule's step survives pruning
    record = select.run(dataclasses.replace(params.select, rule="validation"), tmp_path / "ckpt", tmp_path / "live",
                        tmp_path / "adapter", tmp_path / "select.json", tmp_path / "selection.png")
    assert record["step"] == record["validation_step"] == rule_step and "select.rule=validation" in record["reason"]
    assert record["validation_accuracy"]["validation rule"] == value_at(curve, rule_step)
    assert record["validation_points"] == 3 and (tmp_path / "selection.png").stat().st_size > 10_000

    plain = train.run(params, tmp_path / "base", prompts, tmp_path / "ckpt2", tmp_path / "live2",
                      tmp_path / "summary2.json")  # no validation file: no pass
    assert plain["validation"]["passes"] == 0 and plain["run_id"] == summary["run_id"]
    validated = load_file(tmp_path / "ckpt" / "checkpoint-2" / "adapter_model.safetensors")
    assert distance_from_init(validated) > MOVED  # TOKEN_VARIANT varies in each group: not a 0 == 0 equality
    assert max_difference(validated, load_file(tmp_path / "ckpt2" / "checkpoint-2" / "adapter_model.safetensors")) == 0


def test_select_rule_validation_without_a_curve_is_one_clear_error(tmp_path):
    from tests.test_select import STUDY, write_checkpoint

    write_checkpoint(tmp_path / "ckpt", 4)
    with pytest.raises(ValueError, match="select.rule=validation but no saved checkpoint has a validation point"):
        select.run(dataclasses.replace(STUDY, rule="validation"), tmp_path / "ckpt", tmp_path / "live",
                   tmp_path / "adapter", tmp_path / "s.json", tmp_path / "selection.png")
    assert not any((tmp_path / name).exists() for name in ("adapter", "s.json", "selection.png"))


def test_select_with_only_the_base_models_validation_point(tmp_path):
    """eval_steps beyond max_steps leaves only step 0 (no adapter): no validation step, and the figure still draws."""
    from tests.test_select import STUDY, write_checkpoint

    write_checkpoint(tmp_path / "ckpt", 4)
    tsv = tmp_path / "live" / contracts.LIVE_METRICS / "validation" / "accuracy.tsv"
    tsv.parent.mkdir(parents=True)
    tsv.write_text("timestamp\tstep\taccuracy\n1\t0\t0.25\n")
    record = select.run(dataclasses.replace(STUDY, step=4), tmp_path / "ckpt", tmp_path / "live",
                        tmp_path / "adapter", tmp_path / "s.json", tmp_path / "selection.png")
    assert record["validation_step"] is None and record["validation_points"] == 1
    assert record["validation_accuracy"] == {"select.step": None, "validation rule": None, "reward rule": None}
    assert (tmp_path / "selection.png").stat().st_size > 10_000


def test_a_resumed_run_keeps_protecting_the_rules_step():
    """After a resume the earlier points come from log_history; the rule's step among them is protected before the
    next save, which may come before the next validation (save_steps < eval_steps)."""
    from transformers import TrainerState

    from grpo_gsm8k.training.validation import ValidationPass

    protected = {800}  # CheckpointSync's own set: select.step
    state = TrainerState(global_step=50, log_history=[
        {"step": 0, "validation/accuracy": 0.9}, {"step": 25, "validation/accuracy": 0.5}, {"loss": 0.1, "step": 25},
        {"step": 50, "validation/accuracy": 0.2}])
    validation = ValidationPass([], answer=None, knobs=None, every=25, window=1,
                                protected_steps=protected)
    validation.on_train_begin(None, state, None)
    assert protected == {800, 25} and validation.curve == [(0, 0.9), (25, 0.5), (50, 0.2)]


def test_rerunning_a_finished_run_keeps_the_rules_checkpoint_and_its_passes(tmp_path):
    """A finished run whose train stage reruns (a bookkeeping param changed, `dvc repro -f -s train`) trains nothing,
    but still uploads leftovers and prunes: the validation rule's checkpoint must survive that, and the summary
    must still name it and count the run's passes."""
    from transformers import TrainerState

    from tests.conftest import ONE_BATCH
    from tests.test_checkpoint_sync import write_checkpoint

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "source.json").write_text(json.dumps({"kind": "local", "source": "tiny"}))
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "1+1?", "answer": "2", "qid": "q0"}])
    params = load_params(write_params(tmp_path / "params.yaml", cpu_params_dict(**{
        **ONE_BATCH, "train.max_steps": 8, "train.save_steps": 2, "train.eval_steps": 2, "train.keep_checkpoints": 2,
        "train.checkpoint_remote": "", "select.step": 8, "select.rule": "validation", "select.validation_window": 1})))
    paths = {"model_dir": tmp_path / "base", "data_path": tmp_path / "train.jsonl", "checkpoints": tmp_path / "ckpt",
             "live_dir": tmp_path / "live", "summary_path": tmp_path / "summary.json"}
    train.claim_run(paths["checkpoints"], paths["live_dir"],
                    train.run_identity(params, paths["model_dir"], paths["data_path"]))
    accuracy = {2: 0.9, 4: 0.2, 6: 0.3, 8: 0.4}  # the rule's step is 2
    history = []
    for step in range(1, 9):
        history.append({"loss": 0.1, "reward": 0.1 * step, "step": step})
        if step % 2 == 0:
            history.append({"validation/accuracy": accuracy[step], "validation/seconds": 1.5, "step": step})
        if step in (2, 6, 8):  # what the first run left: the newest 2, and the rule's step
            checkpoint = write_checkpoint(paths["checkpoints"], step)
            TrainerState(global_step=step, log_history=list(history)).save_to_json(
                str(checkpoint / "trainer_state.json"))
    summary = train.run(params, **paths)
    assert (paths["checkpoints"] / "checkpoint-2").is_dir()
    assert summary["validation"]["rule_step"] == 2
    assert (summary["validation"]["passes"], summary["validation"]["seconds"]) == (4, 6.0)
    record = select.run(params.select, paths["checkpoints"], paths["live_dir"], tmp_path / "adapter",
                        tmp_path / "select.json", tmp_path / "selection.png")
    assert record["step"] == 2


class WatchedSet(set):
    """A set that records its contents after every change: what a reader on another thread could see."""

    def __init__(self, *args):
        super().__init__(*args)
        self.seen = []

    def _changed(self, method, *args):
        getattr(super(), method)(*args)
        self.seen.append(set(self))

    def add(self, item):
        self._changed("add", item)

    def discard(self, item):
        self._changed("discard", item)

    def remove(self, item):
        self._changed("remove", item)

    def clear(self):
        self._changed("clear")

    def update(self, *others):
        self._changed("update", *others)


def test_the_protected_steps_never_lack_a_step_while_the_rules_step_moves():
    """CheckpointSync's uploader thread prunes with this set while validation updates it: at no moment may it lack
    select.step, nor both the rule's old and new step."""
    from grpo_gsm8k.training.validation import ValidationPass

    protected = WatchedSet({800})
    validation = ValidationPass([], answer=None, knobs=None, every=25, window=1, protected_steps=protected)
    validation.resume([{"step": 0, "validation/accuracy": 0.1}, {"step": 25, "validation/accuracy": 0.5}])
    validation.curve.append((50, 0.9))  # a new best
    validation._protect_rule_step()
    assert protected == {800, 50} and protected.seen
    assert all(800 in seen and seen & {25, 50} for seen in protected.seen), protected.seen
