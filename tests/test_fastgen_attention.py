"""grpo_gsm8k.fastgen.attention on CPU: the plain-torch reference against SDPA with the additive mask exactly as
fastgen/model.py decode_step/_attend build it (so the reference the GPU tests trust is right), the SDPA fallback,
and, when `triton` is importable, the Triton kernels themselves under TRITON_INTERPRET=1 on small shapes."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from grpo_gsm8k.fastgen import attention as fa

REPO = Path(__file__).resolve().parent.parent


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def make_case(batch: int, n_heads: int, n_kv: int, head_dim: int, attend_len: int, cur: int,
              dtype=torch.bfloat16, device="cpu", seed=0, pads=None):
    """Random q and a (layers, 2, B, Nkv, L, D) cache (L > attend_len) whose layer-1 views are strided like
    st.kv[i, 0]. Slots >= attend_len hold NaN (must never be read); invisible slots below attend_len hold large
    finite values (any mask leak shows). pad_len: row 0 sees everything, row 1 only slot cur, row 2 a short range
    (21 slots), the rest random in [0, cur]."""
    gen = torch.Generator(device=device).manual_seed(seed)
    length = attend_len + 16
    kv = torch.randn(2, 2, batch, n_kv, length, head_dim, generator=gen, device=device)
    q = torch.randn(batch, n_heads, head_dim, generator=gen, device=device)
    if pads is None:
        pads = torch.randint(0, cur + 1, (batch,), generator=torch.Generator().manual_seed(seed))
        pads[:3] = torch.tensor([0, cur, max(cur - 20, 0)])[:batch]
    pad_len = torch.as_tensor(pads, dtype=torch.long, device=device)
    slots = torch.arange(length, device=device)
    hidden = (slots[None] < pad_len[:, None]) | (slots[None] > cur)  # (B, L)
    kv[:, :, hidden[:, None].expand(batch, n_kv, length)] *= 40.0
    kv[..., attend_len:, :] = float("nan")
    kv = kv.to(dtype)
    return q.to(dtype), kv[1, 0], kv[1, 1], pad_len, torch.tensor([cur], device=device)


def attend_as_fastgen(q, k_cache, v_cache, pad_len, cur, attend_len):
    """decode_step's mask and _attend's SDPA call, line for line."""
    b, nq, d = q.shape
    n_kv = k_cache.shape[1]
    slots = torch.arange(attend_len, device=q.device)
    visible = (slots[None] >= pad_len[:, None]) & (slots[None] <= cur)  # (B, attend_len)
    mask = torch.zeros(visible.shape, device=visible.device, dtype=q.dtype).masked_fill_(~visible, float("-inf"))
    out = F.scaled_dot_product_attention(q.view(b, n_kv, nq // n_kv, d), k_cache[:, :, :attend_len],
                                         v_cache[:, :, :attend_len], attn_mask=mask[:, None, None])
    return out.reshape(b, nq, d)


@pytest.mark.parametrize("n_heads,n_kv,head_dim", [(8, 2, 16), (4, 4, 32), (12, 4, 64)])
@pytest.mark.parametrize("attend_len,cur", [(64, 3), (64, 63), (128, 70)])
def test_reference_matches_fastgen_sdpa(n_heads, n_kv, head_dim, attend_len, cur):
    case = make_case(6, n_heads, n_kv, head_dim, attend_len, cur, dtype=torch.float64)
    ref = fa.decode_attention_reference(*case, attend_len)
    assert ref.dtype == torch.float64 and torch.isfinite(ref).all()
    assert rel_err(ref, attend_as_fastgen(*case, attend_len)) < 1e-12
    # in bf16: fp32 maths and one rounding, against SDPA's own bf16 kernel
    bf16 = make_case(6, n_heads, n_kv, head_dim, attend_len, cur, dtype=torch.bfloat16)
    ref16 = fa.decode_attention_reference(*bf16, attend_len)
    assert ref16.dtype == torch.bfloat16
    assert rel_err(ref16, attend_as_fastgen(*bf16, attend_len)) < 1e-2
    assert rel_err(ref16, ref) < 1e-2


def test_reference_gives_zeros_for_a_row_with_no_visible_slot():
    q, k, v, pad_len, cur = make_case(3, 4, 2, 16, 64, 10, dtype=torch.float64, pads=[0, 11, 5])
    out = fa.decode_attention_reference(q, k, v, pad_len, cur, 64)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isfinite(out).all()


def test_decode_attention_without_kernel_runs_sdpa(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = make_case(5, 8, 2, 16, 64, 40)
    assert not fa.kernel_supported(*case[:3])
    assert rel_err(fa.decode_attention(*case, 64), fa.decode_attention_reference(*case, 64)) < 1e-2


# ---- the Triton kernels under the interpreter (a subprocess: TRITON_INTERPRET is read when kernels are defined) --

INTERPRETER_CASES = [  # (B, Nq, Nkv, D, attend_len, cur, splits, dtype)
    (3, 8, 2, 16, 64, 63, None, torch.bfloat16),
    (3, 8, 2, 16, 64, 63, 1, torch.bfloat16),  # one split: the split kernel writes the output itself
    (4, 4, 4, 32, 128, 70, 3, torch.bfloat16),  # G = 1
    (3, 6, 2, 16, 64, 2, 5, torch.float16),  # G = 3 (padded to 16 rows), cur near the start, empty splits
    (2, 16, 2, 64, 64, 33, 16, torch.bfloat16),  # G = 8, the most splits
    (3, 8, 2, 32, 128, 100, None, torch.float16),  # fp16 takes the GPU's MMA branch (bf16 dots are emulated)
]


def interpreter_checks() -> None:
    """Run by the test below in a TRITON_INTERPRET=1 subprocess; raises on any mismatch."""
    assert os.environ.get("TRITON_INTERPRET") == "1"

    def poisoned(rows, splits, head_dim, device):  # every partial must be written, neutral ones too
        return (torch.full((rows, splits, head_dim), float("nan"), device=device),
                torch.full((rows, splits), float("nan"), device=device))

    fa._partials = poisoned
    for b, nq, nkv, d, attend_len, cur, splits, dtype in INTERPRETER_CASES:
        case = make_case(b, nq, nkv, d, attend_len, cur, dtype=dtype, seed=b + d)
        assert fa.kernel_supported(*case[:3])
        ref = fa.decode_attention_reference(*[t.double() if t.is_floating_point() else t for t in case], attend_len)
        out = torch.full_like(case[0], float("nan"))
        result = fa.decode_attention(*case, attend_len, out=out, splits=splits)
        assert result.data_ptr() == out.data_ptr() and torch.isfinite(out).all(), (b, nq, d, splits)
        err = rel_err(out, ref)  # the interpreter truncates fp32 -> bf16 (GPUs round): ~2x the GPU error
        assert err < 1e-2, (b, nq, nkv, d, attend_len, cur, splits, err)
    print("interpreter checks passed")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed: scripts/setup.sh installs it on CPU machines")
def test_kernels_under_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", "from tests.test_fastgen_attention import interpreter_checks as c; "
                           "c()"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "interpreter checks passed" in proc.stdout
