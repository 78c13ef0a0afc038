"""GPU checks of the split-K decode-attention kernels (grpo_gsm8k.fastgen.attention) against the fp64 reference:
training- and eval-like shapes, every output element and every split partial written, never a slot >= attend_len
read (those hold NaN), and correct replays of a captured CUDA graph after pad_len/cur change in place.
Run through the device tool: `pytest -m gpu tests/gpu`."""
from __future__ import annotations

import pytest
import torch

from grpo_gsm8k.fastgen import attention as fa
from tests.test_fastgen_attention import attend_as_fastgen, make_case, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
TOLERANCE = 1e-2


@pytest.fixture
def poisoned_partials(monkeypatch):
    """NaN-filled split partials: a split that skips its (neutral) write poisons the output."""
    def partials(rows, splits, head_dim, device):
        return (torch.full((rows, splits, head_dim), float("nan"), device=device),
                torch.full((rows, splits), float("nan"), device=device))
    monkeypatch.setattr(fa, "_partials", partials)


def reference64(case, attend_len):
    return fa.decode_attention_reference(*[t.double() if t.is_floating_point() else t for t in case], attend_len)


def check(case, attend_len, **knobs) -> float:
    assert fa.kernel_supported(*case[:3])
    out = torch.full_like(case[0], float("nan"))
    fa.decode_attention(*case, attend_len, out=out, **knobs)
    assert torch.isfinite(out).all(), "output not fully written (or NaN read)"
    err = rel_err(out, reference64(case, attend_len))
    assert err <= TOLERANCE, err
    return err


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("attend_len", [64, 128, 384, 640])
@pytest.mark.parametrize("batch", [1, 5, 24, 120])
def test_matches_reference(poisoned_partials, batch, attend_len, group):
    for cur in (3, attend_len // 2, attend_len - 1):  # near the start, middle and end of the bucket
        case = make_case(batch, 8 * group, 8, 128, attend_len, cur, device="cuda", seed=batch + cur)
        check(case, attend_len)


@pytest.mark.parametrize("n_heads,n_kv,head_dim", [(6, 2, 16), (16, 2, 64), (12, 4, 64), (32, 4, 128), (8, 1, 256)])
def test_other_head_layouts(poisoned_partials, n_heads, n_kv, head_dim):
    for dtype in (torch.bfloat16, torch.float16):
        check(make_case(7, n_heads, n_kv, head_dim, 256, 200, dtype=dtype, device="cuda"), 256)


def test_split_count_does_not_change_the_answer(poisoned_partials):
    case = make_case(24, 32, 8, 128, 384, 300, device="cuda")
    outs = [fa.decode_attention(*case, 384, splits=s).float() for s in (1, 2, 3, 7, 16)]
    for out in outs[1:]:
        assert rel_err(out, outs[0]) < 5e-3


def test_at_least_as_close_as_sdpa():
    case = make_case(24, 32, 8, 128, 384, 383, device="cuda")
    ref = reference64(case, 384)
    ours, sdpa = rel_err(fa.decode_attention(*case, 384), ref), rel_err(attend_as_fastgen(*case, 384), ref)
    assert ours <= max(1.5 * sdpa, 2e-3), (ours, sdpa)


def test_unsupported_head_dim_falls_back_to_sdpa():
    case = make_case(5, 8, 2, 96, 128, 100, device="cuda")
    assert not fa.kernel_supported(*case[:3])
    assert rel_err(fa.decode_attention(*case, 128), reference64(case, 128)) <= TOLERANCE


@pytest.mark.parametrize("batch", [24, 240])  # split + combine, and the one-split direct path
def test_cuda_graph_replay_follows_pad_len_and_cur(poisoned_partials, batch):
    attend_len = 384
    q, k, v, pad_len, cur = make_case(batch, 32, 8, 128, attend_len, attend_len - 1, device="cuda")
    for cache in (k, v):  # cur moves over the whole bucket below: no mask-leak poison, but NaN past attend_len
        cache.normal_()
        cache[:, :, attend_len:] = float("nan")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fa.decode_attention(q, k, v, pad_len, cur, attend_len)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fa.decode_attention(q, k, v, pad_len, cur, attend_len)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for new_cur in (5, 130, 383, 200):
        cur.fill_(new_cur)
        pad_len.copy_(torch.randint(0, new_cur + 1, (batch,), device="cuda", generator=gen))
        pad_len[0] = 0
        pad_len[1] = new_cur
        q.normal_(generator=gen)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
        assert rel_err(out, reference64((q, k, v, pad_len, cur), attend_len)) <= TOLERANCE, new_cur
