"""Where the GPU's busy time goes in a profiled step: kernel time by phase and by kind of kernel.

    python bench/trace_kernels.py $OUT/trace_fast.json.gz       # written by bench_grpo_step.py --profile-step N

Reads a torch.profiler Chrome trace. Phases come from the bench's ranges as the GPU saw them: `bench:generation`,
then the rest of `bench:scoring` (the reference forward), then everything after scoring (training: forward, loss,
backward, optimizer). Kernels are sorted into kinds by name (GEMM, attention, Inductor's fused Triton kernels,
fastgen's fused decode kernels, copies, other) and the largest kernels of each phase are listed, so the step's
kernel time can be set against its limits (bytes at the copy bandwidth, FLOPs at the matmul rate) kernel by kernel.
Kernels of one phase may overlap on several streams; their times are summed as run, not as wall time.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.trace_gaps import GPU_CATEGORIES, load  # noqa: E402 (needs the project root on the path as a script)

# (kind, name fragments), first match wins: Inductor's kernels first (their names list the ops they fuse, attention
# included), attention before GEMM (cutlass's attention kernels say "cutlass").
KINDS = (
    ("Inductor fused", ("triton_",)),
    ("attention", ("fmha", "flash", "attention", "_split_kernel", "_combine_kernel")),
    ("GEMM", ("nvjet", "gemm", "cutlass", "splitkreduce", "sm90_xmma", "sm80_xmma")),
    ("fastgen fused", ("_add_rmsnorm_kernel", "_rope_cache_kernel", "_silu_mul_kernel")),
    ("copy/memset", ("memcpy", "memset")),
)
PHASES = ("generation", "scoring", "training")


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in KINDS:
        if any(f in lowered for f in fragments):
            return kind
    return "other"


def phase_windows(events: list[dict]) -> dict[str, tuple[float, float]]:
    """The GPU-side spans (µs) of the bench's generation and scoring ranges (the longest of each name)."""
    spans: dict[str, tuple[float, float]] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") == "gpu_user_annotation" and name in ("bench:generation", "bench:scoring"):
            span = (e["ts"], e["ts"] + e.get("dur", 0))
            if span[1] - span[0] > (spans.get(name, (0, 0))[1] - spans.get(name, (0, 0))[0]):
                spans[name] = span
    return spans


def phase_of(ts: float, windows: dict[str, tuple[float, float]]) -> str | None:
    gen, score = windows.get("bench:generation"), windows.get("bench:scoring")
    if gen and gen[0] <= ts < gen[1]:
        return "generation"
    if score and score[0] <= ts < score[1]:
        return "scoring"
    if score and ts >= score[1]:
        return "training"
    return None  # before the step's rollout (the previous step's tail)


def kernel_time(events: list[dict]) -> dict:
    """{phase: {"by_kind": {kind: s}, "top": [(name, calls, s)], "total": s, "calls": n}}."""
    windows = phase_windows(events)
    by_kind: dict = defaultdict(Counter)
    by_name: dict = defaultdict(Counter)
    calls: dict = defaultdict(Counter)
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in GPU_CATEGORIES:
            continue
        phase = phase_of(e["ts"], windows)
        if phase is None:
            continue
        seconds = e.get("dur", 0) / 1e6
        by_kind[phase][kind_of(e["name"])] += seconds
        by_name[phase][e["name"]] += seconds
        calls[phase][e["name"]] += 1
    return {p: {"by_kind": dict(by_kind[p]), "total": sum(by_kind[p].values()), "calls": sum(calls[p].values()),
                "top": [(n, calls[p][n], s) for n, s in by_name[p].most_common()]} for p in PHASES if p in by_kind}


def report(result: dict, top: int = 8) -> str:
    kinds = [k for k, _ in KINDS] + ["other"]
    lines = ["| phase | kernel s | calls | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 3) + "|"]
    for phase, r in result.items():
        lines.append(f"| {phase} | {r['total']:.3f} | {r['calls']} | "
                     + " | ".join(f"{r['by_kind'].get(k, 0.0):.3f}" for k in kinds) + " |")
    for phase, r in result.items():
        lines += ["", f"| {phase}: largest kernels | calls | s | µs a call |", "|---|---|---|---|"]
        lines += [f"| {n[:90]} | {c} | {s:.4f} | {1e6 * s / c:.1f} |" for n, c, s in r["top"][:top]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trace", help="Chrome trace from torch.profiler (.json or .json.gz)")
    parser.add_argument("--top", type=int, default=8, help="largest kernels listed per phase")
    cli = parser.parse_args()
    print(report(kernel_time(load(cli.trace)), cli.top), end="")


if __name__ == "__main__":
    main()
