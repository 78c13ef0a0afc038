"""The GPU smoke preset and the bench's length emulation: pure logic, so these run on CPU (no gpu marker).

presets/gpu-smoke.yaml must describe what bench/gpu_smoke.py runs on the lent GPU: SmolLM2 on CUDA, the fast
engine, the study's batch shape and completion length, and a select step that is saved and never pruned.
"""
from __future__ import annotations

import pytest
import yaml

from grpo_gsm8k.params import load_params
from grpo_gsm8k.tools.preset import apply_overrides, load_preset, set_param_args
from tests.conftest import REPO, SMOLLM, write_params


def gpu_smoke_params(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    return load_params(write_params(tmp_path / "p.yaml", apply_overrides(params, load_preset("gpu-smoke"))))


def test_gpu_smoke_preset_is_the_study_shape_on_cuda(tmp_path):
    params, study = gpu_smoke_params(tmp_path), load_params(REPO / "params.yaml")
    assert (params.model.source, params.model.device, params.model.dtype) == (SMOLLM, "cuda", "bfloat16")
    assert params.generation.engine == "fast"
    shape = lambda t: (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.num_generations,  # noqa: E731
                       t.max_completion_length, t.beta, t.lora.r, t.lora.dropout)
    assert shape(params.train) == shape(study.train)
    assert params.generation.max_new_tokens == study.generation.max_new_tokens
    assert 100 <= params.train.max_steps <= 300  # "a few hundred steps", inside one 10-minute GPU command
    assert params.select.step <= params.train.max_steps and params.select.step % params.train.save_steps == 0
    assert params.train.checkpoint_remote == study.train.checkpoint_remote  # uploads, like the study
    assert all(" " not in arg for arg in set_param_args(load_preset("gpu-smoke")))


from bench import bench_grpo_step as bench  # noqa: E402 (a failing import must fail these tests, not skip them)


@pytest.mark.parametrize("spec, scale", [("max", None), ("gsm8k", 2.0), ("gsm8k:1.5", 1.5)])
def test_lengths_spec(spec, scale):
    assert bench.parse_lengths(spec) == scale


@pytest.mark.parametrize("spec", ["gsm8k:0", "gsm8k:x", "uniform", "max:2"])
def test_bad_lengths_spec_names_the_fix(spec):
    with pytest.raises(SystemExit, match="use max, gsm8k or gsm8k:SCALE"):
        bench.parse_lengths(spec)


@pytest.mark.parametrize("ids, length, want_ids, want_truncated", [
    ([5, 6, 7, 8, 9, 10], 3, [5, 6, 2], False),  # ends at its drawn length with EOS (id 2)
    ([5, 6, 2], 5, [5, 6, 2], False),  # a real EOS came first: kept
    ([5, 6, 7, 8], 8, [5, 6, 7, 8], True),  # drawn at the cap (max_new 8): stays truncated
    ([5, 6, 7, 8, 9, 10, 11, 12], 1, [2], False),
])
def test_cut_to_lengths(ids, length, want_ids, want_truncated):
    from grpo_gsm8k.fastgen.generator import Sample

    sample = Sample(ids, [-0.5] * len(ids), truncated=ids[-1] != 2)
    cut = bench.cut_to_lengths([sample], [length], eos_id=2, max_new=8)[0]
    assert (cut.completion_ids, cut.truncated) == (want_ids, want_truncated)
    assert len(cut.logprobs) == len(cut.completion_ids)


def test_reference_lengths_scale_and_cap():
    class Words:  # one token per word, enough to check the arithmetic on the real GSM8K answers
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [t.split() for t in texts]}

    one, two = bench.reference_lengths(Words(), 1.0, 10_000, 50), bench.reference_lengths(Words(), 2.0, 80, 50)
    assert len(one) == 50 and all(n >= 1 for n in one)
    assert two == [min(80, 2 * n) for n in one]
