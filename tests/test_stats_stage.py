"""Tests for stages/stats.py: outputs, consistency with the inputs, determinism, degenerate data, bad input.

    python -m pytest tests/test_stats_stage.py -q
"""
import dataclasses
import json
import random
from pathlib import Path

import pytest
import yaml

from grpo_gsm8k.science import analysis, figures
from grpo_gsm8k.params import load_params
from stages import stats as stage
from tests.conftest import REPO, cpu_params_dict, write_params

STUDY = load_params(REPO / "params.yaml")  # the stats section and seed come from params.yaml only


def stats_params(**overrides):
    return dataclasses.replace(STUDY.stats, **overrides)

FIGURES = ["lengths.png", "paired_questions.png", "proportion.png", "proportion_difference.png", "training.png"]
TOP_LEVEL = {"counts", "proportions", "wilson", "two_proportion", "per_question", "gee", "bootstrap", "mcnemar",
             "power", "grading", "lengths", "design", "training", "figures", "behaviours"}


def make_records(p_correct: float, seed: int, questions: int = 20, samples: int = 5) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for qid in range(questions):
        for sample in range(samples):
            correct = rng.random() < p_correct
            ambiguous = rng.random() < 0.1
            records.append({
                "qid": 100 + qid, "sample": sample, "question": f"Question {qid}: how many apples? " * 3,
                "gold": str(qid), "completion": "Let me think. " * rng.randint(5, 80) + f"#### {qid}",
                "n_tokens": rng.randint(30, 512), "truncated": rng.random() < 0.05, "extracted": str(qid),
                "method": "hash", "correct": correct, "ambiguous": ambiguous, "reason": "two markers" * ambiguous,
                "mv_correct": correct != (rng.random() < 0.05), "graders_agree": True, "reward": 1.0,
            })
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_train_log(folder: Path) -> Path:
    for name in ("train/loss", "train/reward", "train/rewards/correctness_reward/mean"):
        file = folder / "plots" / "metrics" / f"{name}.tsv"
        file.parent.mkdir(parents=True, exist_ok=True)
        metric = name.rsplit("/", 1)[-1]
        file.write_text(f"timestamp\tstep\t{metric}\n" + "".join(f"{i}\t{25 * i}\t{0.1 * i}\n" for i in range(12)))
    return folder


def run_stage(tmp_path: Path, base: list[dict], tuned: list[dict], out: str = "out", train_log: bool = True,
              **kwargs) -> tuple[dict, Path]:
    inputs = tmp_path / "inputs"
    inputs.mkdir(exist_ok=True)
    write_jsonl(inputs / "base.jsonl", base)
    write_jsonl(inputs / "tuned.jsonl", tuned)
    log = write_train_log(inputs / "dvclive") if train_log else None
    out_dir = tmp_path / out
    result = stage.run(stats_params(bootstrap_samples=200, **kwargs), STUDY.seed, inputs / "base.jsonl",
                       inputs / "tuned.jsonl", log, out_dir / "stats.json", out_dir / "figures", out_dir / "swaps.json",
                       min_tokens=STUDY.reward.min_tokens)
    return result, out_dir


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The study's design (20 questions x 5 samples), run twice into two folders."""
    tmp_path = tmp_path_factory.mktemp("study")
    base, tuned = make_records(0.73, seed=1), make_records(0.92, seed=2)
    result, first = run_stage(tmp_path, base, tuned, out="first")
    _, second = run_stage(tmp_path, base, tuned, out="second")
    return {"base": base, "tuned": tuned, "result": result, "first": first, "second": second}


def test_writes_every_output(study):
    first = study["first"]
    assert (first / "stats.json").stat().st_size > 0 and (first / "swaps.json").stat().st_size > 0
    assert sorted(p.name for p in (first / "figures").iterdir()) == FIGURES
    assert all((first / "figures" / name).stat().st_size > 10_000 for name in FIGURES)
    assert not list(first.glob(".*"))  # no temporary files left beside the outputs


def test_outputs_are_byte_identical_across_runs(study):
    for name in ["stats.json", "swaps.json"] + [f"figures/{f}" for f in FIGURES]:
        assert (study["first"] / name).read_bytes() == (study["second"] / name).read_bytes(), name


def test_json_has_the_documented_layout_and_no_nan(study):
    text = (study["first"] / "stats.json").read_text()
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert set(data) == TOP_LEVEL
    for path in ("two_proportion/p", "per_question/p_t", "per_question/p_wilcoxon", "gee/p", "mcnemar/p",
                 "bootstrap/ci_low", "power/achieved_power", "grading/sensitivity/ambiguous_as_wrong/two_proportion/p",
                 "grading/sensitivity/ambiguous_as_correct/per_question/p_t"):
        value = data
        for key in path.split("/"):
            value = value[key]
        assert isinstance(value, float), path
    assert data == study["result"]


def correct_count(records, rule=lambda r: r["correct"]) -> int:
    return sum(bool(rule(r)) for r in records)


def test_counts_match_the_inputs(study):
    data, base, tuned = study["result"], study["base"], study["tuned"]
    assert data["counts"] == {"base": {"correct": correct_count(base), "total": 100},
                              "tuned": {"correct": correct_count(tuned), "total": 100}}
    assert data["proportions"]["tuned"] == correct_count(tuned) / 100
    assert data["bootstrap"]["diff"] == pytest.approx((correct_count(tuned) - correct_count(base)) / 100)
    assert data["design"]["questions"] == 20 and data["design"]["samples_per_question"] == 5
    sensitivity = data["grading"]["sensitivity"]
    assert sensitivity["ambiguous_as_correct"]["counts"]["base"]["correct"] == correct_count(
        base, lambda r: r["correct"] or r["ambiguous"])
    assert sensitivity["ambiguous_as_wrong"]["counts"]["tuned"]["correct"] == correct_count(
        tuned, lambda r: r["correct"] and not r["ambiguous"])
    grading = data["grading"]
    disagreeing = [r for r in base + tuned if r["correct"] != r["mv_correct"]]
    assert len(grading["disagreements"]) == len(disagreeing)
    assert grading["agreement"] == pytest.approx(1 - len(disagreeing) / 200)
    assert grading["n_ambiguous"] == len(grading["ambiguous_answers"]) == correct_count(base + tuned,
                                                                                         lambda r: r["ambiguous"])
    assert data["lengths"]["base"]["max"] == max(r["n_tokens"] for r in base)


def test_swap_categories_partition_the_questions(study):
    swaps = json.loads((study["first"] / "swaps.json").read_text())
    assert sorted(row["qid"] for row in swaps) == sorted({r["qid"] for r in study["base"]})
    mcnemar = study["result"]["mcnemar"]
    for category in ("only_tuned", "only_base", "both", "neither"):
        assert sum(row["category"] == category for row in swaps) == mcnemar[category]
    for row in swaps:
        assert (row["base_correct"] * 2 > row["base_samples"]) == (row["category"] in ("both", "only_base"))
        assert row["tuned_score"] == row["tuned_correct"] / row["tuned_samples"]
        assert len(row["base_answer"]["completion"]) <= analysis.EXCERPT_CHARS + 1
        assert row["question"].startswith(f"Question {row['qid'] - 100}:")


# base accuracy, tuned accuracy, questions, samples: the CPU demo's zero-heavy results and other corners
DEGENERATE = [
    (0.0, 0.0, 20, 5),  # all wrong
    (1.0, 1.0, 20, 5),  # all correct
    (0.0, 0.03, 20, 5),  # base 0%, tuned ~2%: separation
    (0.5, 0.8, 1, 5),  # one question
    (0.3, 0.6, 30, 1),  # one sample per question
]


@pytest.mark.parametrize("p_base, p_tuned, questions, samples", DEGENERATE)
def test_degenerate_data_runs_and_says_why(tmp_path, p_base, p_tuned, questions, samples):
    base = make_records(p_base, seed=5, questions=questions, samples=samples)
    tuned = make_records(p_tuned, seed=6, questions=questions, samples=samples)
    result, out = run_stage(tmp_path, base, tuned, train_log=False)
    assert result["counts"]["base"]["total"] == questions * samples
    assert "training.png" not in result["figures"] and result["training"]["notes"]
    if p_base == p_tuned:
        assert result["two_proportion"]["p"] == 1.0 and result["per_question"]["p_t"] == 1.0
        assert result["gee"]["p"] is None and "separation" in result["gee"]["note"]
    if questions == 1:
        assert result["per_question"]["p_t"] is None and result["per_question"]["note_t"]
    json.loads((out / "stats.json").read_text())  # strict JSON (no NaN)


def test_missing_training_log_folder_skips_the_figure(tmp_path):
    base, tuned = make_records(0.4, seed=1), make_records(0.6, seed=2)
    inputs = tmp_path / "in"
    inputs.mkdir()
    result = stage.run(stats_params(bootstrap_samples=50), STUDY.seed, write_jsonl(inputs / "b.jsonl", base),
                       write_jsonl(inputs / "t.jsonl", tuned), tmp_path / "no-such-dvclive", tmp_path / "s.json",
                       tmp_path / "fig", tmp_path / "w.json", min_tokens=STUDY.reward.min_tokens)
    assert result["figures"] == [f for f in FIGURES if f != "training.png"]
    assert "not a folder" in result["training"]["notes"][0]


@pytest.mark.parametrize("content, expected", [
    ("timestamp\tstep\tloss\n1\t0\t0.5\n2\t25\t0.4\n", {"loss": 2}),
    ("step,reward\n0,1.0\n", {"reward": 1}),
    ("not,a,curve\n1,2,3\n", {}),  # no step column: skipped with a note
])
def test_training_log_reads_what_is_there(tmp_path, content, expected):
    (tmp_path / "log").mkdir()
    suffix = "tsv" if "\t" in content else "csv"
    (tmp_path / "log" / f"{next(iter(expected), 'odd')}.{suffix}").write_text(content)
    curves, notes = figures.load_training_log(tmp_path / "log")
    assert {name: len(curve) for name, curve in curves.items()} == expected
    assert bool(notes) == (not expected)


def line_with(records: list[dict], line: int, text: str) -> str:
    lines = [json.dumps(r) for r in records]
    lines[line - 1] = text
    return "\n".join(lines) + "\n"


GOOD = make_records(0.5, seed=9, questions=3, samples=2)
# file content for base.jsonl, the message fragment it must produce
BAD_INPUTS = [
    (None, "base.jsonl: file not found"),
    (line_with(GOOD, 3, "{not json"), "base.jsonl:3: not valid JSON"),
    (line_with(GOOD, 2, json.dumps({k: v for k, v in GOOD[1].items() if k != "correct"})),
     "base.jsonl:2: missing field 'correct'"),
    (line_with(GOOD, 4, json.dumps({**GOOD[3], "correct": "yes"})), "base.jsonl:4: field 'correct' must be bool"),
    (line_with(GOOD, 1, json.dumps({**GOOD[0], "qid": True})), "base.jsonl:1: field 'qid' must be int"),
    (line_with(GOOD, 5, json.dumps(GOOD[0])), "base.jsonl:5: duplicate answer"),
    (line_with(GOOD, 6, "[1, 2]"), "base.jsonl:6: a record must be a JSON object"),
    ("\n", "base.jsonl: holds no completion records"),
    ("".join(json.dumps(r) + "\n" for r in GOOD[:4]), "evaluate both models on the same set"),
]


@pytest.mark.parametrize("content, message", BAD_INPUTS)
def test_bad_input_names_the_file_and_writes_nothing(tmp_path, content, message):
    base = tmp_path / "base.jsonl"
    if content is not None:
        base.write_text(content)
    tuned = write_jsonl(tmp_path / "tuned.jsonl", GOOD)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message) as error:
        stage.run(stats_params(bootstrap_samples=20), STUDY.seed, base, tuned, None, out / "stats.json",
                  out / "figures", out / "swaps.json", min_tokens=STUDY.reward.min_tokens)
    fix = "evaluate both models" if "same set" in message else "dvc repro"  # every message says how to fix it
    assert len(str(error.value).splitlines()) == 1 and fix in str(error.value)
    assert not out.exists()


def test_failure_while_writing_leaves_old_outputs_untouched(tmp_path, monkeypatch):
    base, tuned = make_records(0.4, seed=1, questions=4), make_records(0.6, seed=2, questions=4)
    _, out = run_stage(tmp_path, base, tuned, train_log=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(figures, "plot_lengths", broken)
    with pytest.raises(RuntimeError):
        run_stage(tmp_path, make_records(0.1, seed=3, questions=4), tuned, train_log=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == ["figures", "stats.json", "swaps.json"]


def main_args(tmp_path: Path, base: Path, tuned: Path, params: Path) -> list[str]:
    return ["--params", str(params), "--base", str(base), "--tuned", str(tuned), "--out", str(tmp_path / "s.json"),
            "--figures", str(tmp_path / "f"), "--swaps", str(tmp_path / "w.json")]


# stats param, bad value, the one error line (the bounds are params.py's, as for every other stage)
BAD_PARAMS = [
    ("stats.alpha", 1.5, "error: stats.alpha=1.5 must be in (0, 1)"),
    ("stats.power_target", 0, "error: stats.power_target=0.0 must be in (0, 1)"),
    ("stats.bootstrap_samples", 0, "error: stats.bootstrap_samples=0 must be >= 100"),
]


@pytest.mark.parametrize("key, value, message", BAD_PARAMS)
def test_main_rejects_bad_params_with_one_error_line(tmp_path, capsys, key, value, message):
    good = write_jsonl(tmp_path / "b.jsonl", GOOD)
    params = write_params(tmp_path / "p.yaml", cpu_params_dict(**{key: value}))
    with pytest.raises(SystemExit) as exit_info:
        stage.main(main_args(tmp_path, good, good, params))
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith(message) and not (tmp_path / "s.json").exists()


def test_main_takes_the_stats_section_and_seed_from_params(tmp_path, capsys):
    base = write_jsonl(tmp_path / "b.jsonl", make_records(0.3, seed=1, questions=5))
    tuned = write_jsonl(tmp_path / "t.jsonl", make_records(0.7, seed=2, questions=5))
    params = write_params(tmp_path / "p.yaml", cpu_params_dict(**{
        "seed": 7, "stats.alpha": 0.1, "stats.bootstrap_samples": 150, "stats.power_target": 0.9,
        "reward.min_tokens": 2}))
    stage.main(main_args(tmp_path, base, tuned, params))
    data = json.loads((tmp_path / "s.json").read_text())
    assert {key: data["design"][key] for key in ("seed", "alpha", "bootstrap_samples", "power_target")} == {
        "seed": 7, "alpha": 0.1, "bootstrap_samples": 150, "power_target": 0.9}
    assert data["behaviours"]["short"]["min_tokens"] == 2  # the reward's gate, from params.yaml
    out = capsys.readouterr().out
    assert f"base {data['counts']['base']['correct']}/25" in out
    assert f"mean tokens {data['behaviours']['length']['means']['base']:.1f} -> " in out


def test_dvc_yaml_passes_no_params_on_the_command_line():
    """The stage reads seed, stats and reward.min_tokens from params.yaml (declared as its params), not from flags
    with defaults."""
    stats = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["stats"]
    assert "${" not in stats["cmd"].replace("${item.set}", "")
    assert stats["params"] == ["seed", "stats", "reward.min_tokens"]
