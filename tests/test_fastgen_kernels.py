"""fastgen's fused Triton kernels (add+RMSNorm, RoPE + KV-cache write, SiLU*up) against the plain-torch ops they
replace, on CPU under TRITON_INTERPRET=1 with small bf16 shapes, so a change to a kernel is caught in CI and not
only on the next GPU lease (tests/gpu/test_fastgen_kernels_gpu.py runs the same checks at the study's shapes)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BF16 = torch.bfloat16


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


def interpreter_checks() -> None:
    """Run by the test below in a TRITON_INTERPRET=1 subprocess (triton reads it at import); raises on a mismatch."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from grpo_gsm8k.fastgen import kernels as kernels
    from grpo_gsm8k.fastgen.model import apply_rope, rms_norm

    assert kernels.enabled(torch.device("cpu"))
    torch.manual_seed(0)
    x, delta, weight = torch.randn(3, 96, dtype=BF16), torch.randn(3, 96, dtype=BF16), torch.randn(96, dtype=BF16)
    ref_x = x + delta
    out = kernels.add_rmsnorm(x, delta, weight, 1e-5)
    # in place, and within one bf16 ulp: the interpreter truncates fp32 -> bf16 where a GPU rounds (the GPU test
    # asserts bitwise equality)
    assert torch.allclose(x.float(), ref_x.float(), rtol=2 ** -7, atol=0), "the residual add must land in x"
    assert rel_err(out, rms_norm(ref_x, weight, 1e-5)) < 1e-2
    assert rel_err(kernels.add_rmsnorm(ref_x.clone(), None, weight, 1e-5), rms_norm(ref_x, weight, 1e-5)) < 1e-2

    b, nq, nkv, d, length, slot = 3, 4, 2, 16, 40, 23
    qkv = torch.randn(b, (nq + 2 * nkv) * d, dtype=BF16)
    cos, sin = torch.randn(length, d, dtype=BF16), torch.randn(length, d, dtype=BF16)
    pad_len, cur = torch.tensor([0, 5, 11]), torch.tensor([slot])
    kv = torch.randn(2, b, nkv, length, d, dtype=BF16)
    before = kv.clone()
    q = kernels.rope_cache(qkv, cos, sin, pad_len, cur, kv[0], kv[1], nq, nkv)
    pos = cur - pad_len  # each row's position counts from its first non-pad slot
    q_ref, k_ref, v_ref = qkv.split([nq * d, nkv * d, nkv * d], -1)
    assert rel_err(q, apply_rope(q_ref.view(b, nq, d), cos[pos][:, None], sin[pos][:, None])) < 1e-2
    assert rel_err(kv[0, :, :, slot], apply_rope(k_ref.view(b, nkv, d), cos[pos][:, None], sin[pos][:, None])) < 1e-2
    assert torch.equal(kv[1, :, :, slot], v_ref.view(b, nkv, d))
    untouched = torch.ones(length, dtype=torch.bool)
    untouched[slot] = False
    assert torch.equal(kv[:, :, :, untouched], before[:, :, :, untouched]), "only slot cur may be written"

    gate_up = torch.randn(3, 2 * 1100, dtype=BF16)  # 1,100 columns: two blocks of 1,024, the second partial
    gate, up = gate_up.chunk(2, -1)
    assert rel_err(kernels.silu_mul(gate_up), torch.nn.functional.silu(gate) * up) < 1e-2
    print("kernel interpreter checks passed")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed: scripts/setup.sh installs it on CPU machines")
def test_fused_kernels_match_torch_under_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", "from tests.test_fastgen_kernels import interpreter_checks as c; c()"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "kernel interpreter checks passed" in proc.stdout
