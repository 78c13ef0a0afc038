"""The bench scripts run on the GPU through the device tool, never in CI; their --tiny modes run here on CPU so a
change to the code they drive (trainer setup, generator, CLI) cannot leave them broken until the next GPU lease."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import trace_gaps as gaps
from bench import trace_kernels as kernels

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "bench_grpo_step": ["--tiny", "--steps", "2", "--engine", "trl,fast,fast-v1", "--max-completion", "8",
                        "--beta", "0.04", "--lora-dropout", "0.05", "--profile-step", "2"],
    "bench_multi_gpu": ["--tiny", "--cpu", "--gpus", "1,2", "--steps", "2", "--max-completion", "8"],
    "bench_eval_generation": ["--tiny", "--batch", "10", "--chunks", "2", "--max-new", "8"],
    "bench_decode_attention": ["--tiny"],
    "padding_tokens": ["--tiny"],
}


def markdown_tables(text: str) -> list[list[str]]:
    """The body rows of each markdown table in text, table by table (header and |---| rule left out)."""
    tables, current = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            current = None
        elif current is None:
            current = []
            tables.append(current)  # this line is the header
        elif not line.startswith("|---"):
            current.append(line)
    return tables


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_bench_script_runs_its_tiny_mode(script, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "TRL_EXPERIMENTAL_SILENCE": "1"}
    if script == "bench_decode_attention":
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed: scripts/setup.sh installs it on CPU machines")
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / f"{script}.py"), *SCRIPTS[script],
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    table = (tmp_path / f"{script}.md").read_text()
    tables = markdown_tables(table)
    assert tables and tables[0], table
    if script == "bench_multi_gpu":
        assert "=== N=1: ok" in proc.stdout and "=== N=2: ok" in proc.stdout, proc.stdout[-2000:]
    if script == "bench_grpo_step":
        step_table, limits_table = tables[0], tables[1]  # one row per engine in each
        assert [r.split("|")[1].strip() for r in step_table] == ["trl", "fast", "fast-v1"], table
        assert [r.split("|")[1].strip() for r in limits_table] == ["trl", "fast", "fast-v1"], table
        assert (tmp_path / "profile_fast.txt").read_text().startswith("GPU window")  # trace_gaps.py's account
        assert (tmp_path / "trace_fast.json.gz").is_file()


def _op(name, ts, dur, cat="cpu_op", **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 1, "args": args}


def _kernel(ts, dur, correlation, stream=7):
    return {"ph": "X", "cat": "kernel", "name": "k", "ts": ts, "dur": dur, "pid": 0, "tid": stream,
            "args": {"correlation": correlation, "stream": stream}}


def test_trace_gaps_charges_each_idle_gap_to_the_host_code_around_it():
    events = [
        _op("bench:scoring", 0, 1000, cat="user_annotation"),
        _op("trl:_calculate_rewards", 100, 500, cat="user_annotation"),
        _op("aten::item", 150, 250),                   # waits for kernel 1, then the host scores rewards
        _op("cudaLaunchKernel", 0, 5, cat="cuda_runtime", correlation=1),
        _op("cudaLaunchKernel", 650, 5, cat="cuda_runtime", correlation=2),
        _op("aten::mm", 640, 20),                      # launches kernel 2
        _op("cudaLaunchKernel", 661, 5, cat="cuda_runtime", correlation=3),
        _kernel(10, 190, 1),                           # busy 10-200
        _kernel(700, 100, 2),                          # idle 200-700: the rewards
        _kernel(790, 50, 3, stream=8),                 # overlaps on another stream: no gap
        _kernel(845, 10, 3),                           # a 5 µs hole: under the threshold
    ]
    result = gaps.analyse(events, min_us=20.0)
    assert result["gaps"] == 1
    assert result["busy_s"] == pytest.approx((190 + 140 + 10) / 1e6)
    assert result["idle_s"] == pytest.approx((855 - 10) / 1e6 - result["busy_s"])
    assert result["by_phase"] == {"bench:scoring": pytest.approx(500 / 1e6)}
    waited, launched = "bench:scoring > trl:_calculate_rewards > aten::item", "bench:scoring > aten::mm"
    assert result["by_pair"] == {(waited, launched): (1, pytest.approx(500 / 1e6))}
    assert "| bench:scoring | 0.001 |" in gaps.report(result)


def test_trace_gaps_reads_an_empty_trace():
    assert gaps.analyse([_op("aten::mm", 0, 5)])["gaps"] == 0


@pytest.mark.parametrize("name, kind", [
    ("nvjet_sm90_tst_128x24_64x11_2x1_v_bz_TNT", "GEMM"),  # cuBLAS on Hopper
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float>", "GEMM"),  # the reduction of a split-K GEMM
    ("fmha_cutlassB_bf16_aligned_128x128_k128_sm80(PyTorchMemEffAttention::AttentionBackwardKernel)", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>", "attention"),
    ("_split_kernel", "attention"),  # fastgen's split-K decode attention
    ("triton_poi_fused__scaled_dot_product_efficient_attention__unsafe_view_add", "Inductor fused"),  # not attention
    ("triton_red_fused__to_copy_add_mean_mul_native_dropout_pow_rsqrt_0", "Inductor fused"),
    ("_add_rmsnorm_kernel", "fastgen fused"),
    ("Memcpy DtoD (Device -> Device)", "copy/memset"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
])
def test_trace_kernels_sorts_kernels_into_kinds(name, kind):
    assert kernels.kind_of(name) == kind


def test_trace_kernels_splits_busy_time_by_phase_as_the_gpu_saw_it():
    def kernel(name, ts, dur):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}

    events = [
        _op("bench:scoring", 100, 900, cat="gpu_user_annotation"),  # the rollout and the reference forward
        _op("bench:generation", 100, 500, cat="gpu_user_annotation"),
        _op("bench:generation", 50, 1, cat="gpu_user_annotation"),  # a zero-length marker: the longest one counts
        kernel("triton_poi_fused_add_0", 0, 20),  # before the rollout: the previous step's tail, not counted
        kernel("nvjet_decode", 150, 300),
        kernel("_split_kernel", 460, 40),
        kernel("nvjet_reference", 700, 200),
        kernel("fmha_cutlassB", 1100, 60),
        kernel("nvjet_backward", 1200, 100),
        kernel("nvjet_backward", 1400, 100),
    ]
    result = kernels.kernel_time(events)
    assert list(result) == ["generation", "scoring", "training"]
    assert result["generation"]["by_kind"] == {"GEMM": pytest.approx(300e-6), "attention": pytest.approx(40e-6)}
    assert result["scoring"]["total"] == pytest.approx(200e-6)
    assert result["training"]["calls"] == 3
    assert result["training"]["top"][0] == ("nvjet_backward", 2, pytest.approx(200e-6))
    table = kernels.report(result)
    assert "| training | 0.000 | 3 |" in table and "| nvjet_backward | 2 | 0.0002 | 100.0 |" in table
