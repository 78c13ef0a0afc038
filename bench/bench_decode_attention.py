"""Decode attention per layer: SDPA as fastgen_model._attend calls it vs the split-K Triton kernel.

    python bench/bench_decode_attention.py                 # on one H100 (device tool)
    python bench/bench_decode_attention.py --sweep         # also try launch knobs (splits, tile, warps, stages)
    TRITON_INTERPRET=1 python bench/bench_decode_attention.py --tiny     # CPU smoke test of the script

Llama-3-8B heads (32 query, 8 KV, head_dim 128, bf16). Each implementation is captured in one CUDA graph of
`--layers` calls, call i reading layer i of a (layers, 2, B, Nkv, L, D) cache, so L2 never holds the K/V it reads
(as in a real decode step) and launches cost what they cost in fastgen's graphs; the graph is timed with
triton.testing.do_bench (median) and divided by the layer count. SDPA gets its additive mask prebuilt (fastgen builds
it once per step, not per layer). Every row sees slots [pad_len, attend_len - 1], pad_len 0 unless --pad, and
GB/s counts the K/V bytes of all attend_len slots, what SDPA reads. Appends the table to $OUT/bench_decode_attention.md
(or --out).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo_gsm8k.fastgen import attention as fa  # noqa: E402

SHAPES = [(24, 128), (24, 256), (24, 384), (120, 640), (240, 640)]  # (batch, attend_len): rollout, then eval
TINY_SHAPES = [(2, 64), (3, 128)]


def sdpa_as_attend(q, k, v, mask, attend_len):
    b, nq, d = q.shape
    out = F.scaled_dot_product_attention(q.view(b, k.shape[1], nq // k.shape[1], d), k[:, :, :attend_len],
                                         v[:, :, :attend_len], attn_mask=mask)
    return out.reshape(b, nq, d)


def time_per_layer(fn, layers: int, cuda: bool, rep_ms: int = 300) -> float:
    """Microseconds per call of fn(layer), the calls for all layers captured in one graph (CPU: one eager pass)."""
    if not cuda:
        start = time.perf_counter()
        for i in range(layers):
            fn(i)
        return (time.perf_counter() - start) / layers * 1e6
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # JIT and lazy inits outside the capture
        for i in range(layers):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(layers):
            fn(i)
    ms = triton.testing.do_bench(graph.replay, warmup=rep_ms // 6, rep=rep_ms, return_mode="median")
    del graph
    return ms * 1e3 / layers


def bench_shape(batch, attend_len, args, device, knob_sets):
    """Rows: (knobs, kernel us) for each knob set, plus SDPA us and the kernel's error against SDPA."""
    n_kv, n_q, d, dtype = args.kv_heads, args.kv_heads * args.group, args.head_dim, torch.bfloat16
    length = attend_len + 64  # the cache is longer than the attended bucket, as in fastgen
    gen = torch.Generator(device=device).manual_seed(0)
    kv = torch.randn(args.layers, 2, batch, n_kv, length, d, device=device, dtype=dtype, generator=gen)
    q = torch.randn(batch, n_q, d, device=device, dtype=dtype, generator=gen)
    pad_len = torch.randint(0, args.pad + 1, (batch,), device=device, generator=gen)
    cur = torch.tensor([attend_len - 1], device=device)
    slots = torch.arange(attend_len, device=device)
    visible = (slots[None] >= pad_len[:, None]) & (slots[None] <= cur)
    mask = torch.zeros(visible.shape, device=device, dtype=dtype).masked_fill_(~visible, float("-inf"))[:, None, None]
    cuda = device.type == "cuda"
    sdpa_us = time_per_layer(lambda i: sdpa_as_attend(q, kv[i, 0], kv[i, 1], mask, attend_len), args.layers, cuda)
    ref = sdpa_as_attend(q, kv[0, 0], kv[0, 1], mask, attend_len).float()
    rows = []
    for knobs in knob_sets:
        try:
            us = time_per_layer(lambda i: fa.decode_attention(q, kv[i, 0], kv[i, 1], pad_len, cur, attend_len,
                                                              **knobs), args.layers, cuda, 300 if knobs == {} else 100)
        except Exception as exc:  # noqa: BLE001  (a sweep point that does not compile / fit)
            print(f"  {batch}x{attend_len} {knobs}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
            continue
        out = fa.decode_attention(q, kv[0, 0], kv[0, 1], pad_len, cur, attend_len, **knobs).float()
        rows.append((knobs, us, ((out - ref).norm() / ref.norm()).item()))
    gbytes = batch * n_kv * attend_len * d * 2 * kv.element_size() / 1e9
    del kv
    return sdpa_us, rows, gbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and 2 layers (CPU, TRITON_INTERPRET=1)")
    parser.add_argument("--shapes", default="", help="batch:attend_len,... (default: the study's five)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--pad", type=int, default=0, help="pad_len of each row drawn from 0..PAD")
    parser.add_argument("--sweep", action="store_true", help="also time splits x block_n x warps x stages")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    shapes = [tuple(map(int, s.split(":"))) for s in args.shapes.split(",") if s] or SHAPES
    if args.tiny:
        shapes, args.layers, args.kv_heads, args.head_dim = TINY_SHAPES, 2, 2, 16
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("no CUDA device: set TRITON_INTERPRET=1 to smoke-test the kernel path (else both columns are SDPA)")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    lines = [f"\n### decode attention per layer · {time.strftime('%Y-%m-%d %H:%M')} · {card} · torch "
             f"{torch.__version__} · Nq {args.kv_heads * args.group}, Nkv {args.kv_heads}, D {args.head_dim}, bf16, "
             f"{args.layers} layers rotated, pad 0..{args.pad}\n",
             "| B | attend_len | splits | SDPA µs | kernel µs | speed-up | SDPA GB/s | kernel GB/s | rel err vs SDPA |",
             "|---|---|---|---|---|---|---|---|---|"]
    sweeps = []
    for batch, attend_len in shapes:
        sdpa_us, rows, gbytes = bench_shape(batch, attend_len, args, device, [{}])
        (_, us, err), = rows
        splits = fa.num_splits(batch, args.kv_heads, attend_len, device)
        lines.append(f"| {batch} | {attend_len} | {splits} | {sdpa_us:.1f} | {us:.1f} | {sdpa_us / us:.2f}x | "
                     f"{gbytes / sdpa_us * 1e6:.0f} | {gbytes / us * 1e6:.0f} | {err:.1e} |")
        print(lines[-1], flush=True)
        if args.sweep:
            grid = [dict(splits=s, block_n=n, num_warps=w, num_stages=st) for s, n, w, st in
                    itertools.product((1, 2, 3, 4, 6, 8), (32, 64), (2, 4, 8), (2, 3))]
            _, rows, _ = bench_shape(batch, attend_len, args, device, grid[:4] if args.tiny else grid)
            for knobs, us, err in sorted(rows, key=lambda r: r[1])[:6]:
                knobs = " ".join(f"{k}={v}" for k, v in knobs.items())
                sweeps.append(f"| {batch} | {attend_len} | {knobs} | {us:.1f} | {gbytes / us * 1e6:.0f} | {err:.1e} |")
    if sweeps:
        lines += ["\nfastest launch knobs per shape (the table above uses the heuristic):\n",
                  "| B | attend_len | knobs | kernel µs | GB/s | rel err vs SDPA |",
                  "|---|---|---|---|---|---|"] + sweeps
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out) / "bench_decode_attention.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
