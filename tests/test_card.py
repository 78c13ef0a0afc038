"""Tests for the model card: grpo_gsm8k/science/model_card.py (tables) and stages/card.py (on a real LoRA adapter).

    python -m pytest tests/test_card.py -q

The card's front matter must parse with huggingface_hub.ModelCard and carry this run's numbers, exactly as the
evaluate stage wrote them; the folder must still load with peft once the card is in it; a missing or stale input
is one error line and leaves the old card in place.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from grpo_gsm8k import contracts
from grpo_gsm8k.params import load_params
from grpo_gsm8k.science import model_card as mc
from tests.conftest import REPO, SMOLLM, cpu_params_dict, write_params

STUDY = load_params(REPO / "params.yaml")
SMOLLM_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def metrics(correct: int, total: int, questions: int, greedy_correct: int | None) -> dict:
    """The accuracy fields of a metrics.json, as grpo_gsm8k.answering.summarize writes them."""
    return {"correct": correct, "total": total, "accuracy": correct / total, "questions": questions,
            "greedy_correct": greedy_correct,
            "greedy_accuracy": None if greedy_correct is None else greedy_correct / questions}


def card_inputs(source: str = "meta-llama/Llama-3.1-8B-Instruct", kind: str = "hub", greedy: bool = True):
    settings = {"train": dataclasses.asdict(STUDY.train), "reward": dataclasses.asdict(STUDY.reward),
                "generation": dataclasses.asdict(STUDY.generation), "seed": STUDY.seed,
                "train_questions": STUDY.data.train_questions}
    sets = [mc.SetScores("study", 5, metrics(73, 100, 20, 15 if greedy else None),
                         metrics(92, 100, 20, 19 if greedy else None)),
            mc.SetScores("test", 1, metrics(1000, 1319, 1319, 1010 if greedy else None),
                         metrics(1101, 1319, 1319, 1120 if greedy else None))]
    select = {"step": 800, "reason": "select.step=800 in params.yaml, chosen by hand"}
    return mc.CardInputs(source, kind, "models/adapter", settings, select, sets)


@pytest.mark.parametrize("source, kind, expected", [
    ("meta-llama/Llama-3.1-8B-Instruct", "hub", "meta-llama/Llama-3.1-8B-Instruct"),  # a hub id is itself
    (SMOLLM, "gguf", SMOLLM_ID),  # the CPU preset's GGUF: its package documents the origin
    ("pypi:other_pkg/Model.Q4_1.gguf", "gguf", None),  # a packaged GGUF nobody documented
    ("/models/SmolLM2-135M-Instruct.Q4_1.gguf", "gguf", None),  # a file name is no provenance
    ("models/llama", "local", None),  # a local folder, even one that looks like an id
])
def test_base_model_id(source, kind, expected):
    assert mc.base_model_id(source, kind) == expected


@pytest.mark.parametrize("source, kind, base_model", [
    ("meta-llama/Llama-3.1-8B-Instruct", "hub", "meta-llama/Llama-3.1-8B-Instruct"),
    (SMOLLM, "gguf", SMOLLM_ID),
    ("/data/my-model", "local", None),  # no hub id: the key is left out, not guessed
])
def test_front_matter_keys(source, kind, base_model):
    front = mc.front_matter(card_inputs(source, kind))
    assert front.get("base_model") == base_model and ("base_model" in front) == (base_model is not None)
    assert front["library_name"] == "peft" and front["datasets"] == ["openai/gsm8k"]
    assert front["tags"] == ["trl", "grpo", "lora"]


@pytest.mark.parametrize("greedy", [True, False])
def test_model_index_holds_the_tuned_accuracies(greedy):
    inputs = card_inputs(greedy=greedy)
    (entry,) = mc.front_matter(inputs)["model-index"]
    assert len(entry["results"]) == len(inputs.sets)
    for result, scores in zip(entry["results"], inputs.sets):
        assert result["task"]["type"] == "text-generation"
        assert {k: result["dataset"][k] for k in ("type", "config", "split")} == \
            {"type": "openai/gsm8k", "config": "main", "split": "test"}
        assert scores.name in result["dataset"]["name"]
        values = [m["value"] for m in result["metrics"]]
        wanted = [scores.tuned["accuracy"]] + ([scores.tuned["greedy_accuracy"]] if greedy else [])
        assert values == wanted and {m["type"] for m in result["metrics"]} == {"accuracy"}


def test_body_states_settings_results_and_usage():
    inputs = card_inputs()
    body = mc.render_body(inputs)
    t = STUDY.train
    for text in (f"step {inputs.select['step']}", "5e-06", f"r {t.lora.r}, alpha {t.lora.alpha}", "beta",
                 f"{t.num_generations} generations", f"`{STUDY.reward.variant}`",
                 "| study | 20 questions x 5 | 73/100 (73.0%) | 92/100 (92.0%) | 15/20 (75.0%) | 19/20 (95.0%) |",
                 "| test | 1319 questions x 1 | 1000/1319 (75.8%) | 1101/1319 (83.5%) |",
                 'PeftModel.from_pretrained(base, "models/adapter")',
                 'AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.1-8B-Instruct")',
                 "hf upload <user>/<repo> models/adapter", "upload_folder("):
        assert text in body, text


def test_body_without_a_hub_id_says_why():
    body = mc.render_body(card_inputs("/data/my-model", "local"))
    assert "`base_model` is left out" in body and 'from_pretrained("/data/my-model")' in body


def test_body_without_greedy_says_it_was_off():
    assert "not run (evaluation.greedy is off)" in mc.render_body(card_inputs(greedy=False))


# ---- the stage, on a real adapter ------------------------------------------------------------------------------

def answer_metrics(golds: list[str], answers: list[str], greedy: list[str] | None) -> dict:
    """A metrics.json made by the code the baseline and evaluate stages use (one sampled answer per question)."""
    from grpo_gsm8k.answering import summarize
    from grpo_gsm8k.science.grading import grade

    def records(texts):
        return [{"qid": i, "sample": 0, "question": "q", "gold": gold, "completion": text, "n_tokens": 5,
                 "truncated": False, **dataclasses.asdict(grade(text, gold))}
                for i, (gold, text) in enumerate(zip(golds, texts))]

    return summarize(records(answers), records(greedy) if greedy is not None else None)


@pytest.fixture
def pipeline_tree(tmp_path, tiny_model_dir):
    """The card stage's inputs as the pipeline lays them out: a real LoRA adapter written by the select stage (from
    a checkpoint saved by peft), select.json, and each set's baseline and evaluate metrics.json."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from grpo_gsm8k.training.checkpoint_sync import build_manifest, write_local_manifest
    from stages import select

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    checkpoint = tmp_path / "models" / "checkpoints" / "checkpoint-2"
    model.save_pretrained(checkpoint)
    write_local_manifest(checkpoint, build_manifest(checkpoint, 2))
    params_path = write_params(tmp_path / "params.yaml", cpu_params_dict(**{
        "select.step": 2, "evaluation.sets": {"study": {"questions": 3, "samples": 1},
                                              "test": {"questions": 3, "samples": 1}}}))
    params = load_params(params_path)
    select.run(params.select, checkpoint.parent, tmp_path / "live", tmp_path / "models" / "adapter",
               tmp_path / "results" / "select.json", tmp_path / "reports" / "figures" / "selection.png")
    golds = ["3", "5", "8"]
    for stage, answers in (("baseline", ["#### 3", "#### 4", "#### 9"]), ("evaluate", ["#### 3", "#### 5", "7"])):
        for name in params.evaluation.sets:
            path = tmp_path / "results" / stage / name / contracts.ANSWER_METRICS
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(answer_metrics(golds, answers, answers)))
    return tmp_path, params_path


def run_card(root: Path, params_path: Path) -> Path:
    from stages import card

    return card.run(load_params(params_path), root / "models" / "adapter", root / "results" / "select.json",
                    root / "results" / "baseline", root / "results" / "evaluate")


def test_card_parses_and_the_folder_still_loads_with_peft(pipeline_tree, tiny_model_dir):
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    root, params_path = pipeline_tree
    path = run_card(root, params_path)
    assert path == root / "models" / "adapter" / contracts.MODEL_CARD
    card = ModelCard.load(path)
    assert card.data.base_model == SMOLLM_ID  # the CPU preset's model.source, a packaged GGUF
    assert card.data.library_name == "peft" and card.data.datasets == ["openai/gsm8k"]
    assert set(card.data.tags) == {"trl", "grpo", "lora"}
    tuned = {name: json.loads((root / "results" / "evaluate" / name / contracts.ANSWER_METRICS).read_text())
             for name in ("study", "test")}
    assert [r.metric_value for r in card.data.eval_results] == \
        [value for name in ("study", "test") for value in (tuned[name]["accuracy"], tuned[name]["greedy_accuracy"])]
    assert {(r.task_type, r.dataset_type, r.dataset_config, r.dataset_split) for r in card.data.eval_results} == \
        {("text-generation", "openai/gsm8k", "main", "test")}
    assert "| study | 3 questions x 1 | 1/3 (33.3%) | 2/3 (66.7%) |" in card.text
    assert "&id" not in path.read_text()  # plain YAML, no anchors and aliases
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([*contracts.ADAPTER_FILES, contracts.MODEL_CARD])

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), path.parent)
    saved = load_file(path.parent / contracts.ADAPTER_WEIGHTS)
    state = loaded.state_dict()
    for key, tensor in saved.items():
        (match,) = [k for k in state if k.replace(".default", "") == key]
        assert state[match].equal(tensor), key
    assert run_card(root, params_path).read_bytes() == path.read_bytes()  # no timestamps: a rerun is identical


@pytest.mark.parametrize("damaged, text, message", [
    ("results/evaluate/test/metrics.json", None,  # None: the file is deleted
     "results/evaluate/test/metrics.json not found; the evaluate stage writes it (dvc repro)"),
    ("results/baseline/study/metrics.json", '{"correct": 1}',
     "results/baseline/study/metrics.json lacks 'total'; it is out of date, rerun the baseline stage (dvc repro)"),
    ("results/select.json", "{", "results/select.json is not valid JSON"),
    ("models/adapter/adapter_config.json", None,
     "models/adapter/adapter_config.json not found; the select stage writes it (dvc repro)"),
], ids=["missing metrics", "stale metrics", "broken select.json", "missing adapter file"])
def test_bad_input_is_one_line_and_keeps_the_old_card(pipeline_tree, capsys, damaged, text, message):
    from stages import card

    root, params_path = pipeline_tree
    old = root / "models" / "adapter" / contracts.MODEL_CARD
    old.write_text("the previous card\n")
    if text is None:
        (root / damaged).unlink()
    else:
        (root / damaged).write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        card.main(["--params", str(params_path), "--adapter", str(root / "models/adapter"),
                   "--select", str(root / "results/select.json"), "--baseline", str(root / "results/baseline"),
                   "--evaluate", str(root / "results/evaluate")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and len(err.strip().splitlines()) == 1 and message in err, err
    assert old.read_text() == "the previous card\n"
    assert [p.name for p in old.parent.iterdir() if p.name.startswith(".")] == []  # no temporary file left
