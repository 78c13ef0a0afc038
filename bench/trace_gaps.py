"""Where the GPU sits idle in a profiled step, and what the host was doing meanwhile.

    python bench/trace_gaps.py $OUT/trace_fast.json.gz          # written by bench_grpo_step.py --profile-step N

Reads a torch.profiler Chrome trace. The GPU is busy while any kernel, copy or memset runs (on any stream); every
hole in that union longer than --min-us is an idle gap. A gap is charged to the host code around its two edges:
the CPU op that was waiting when the GPU ran dry (a `.item()`, `.tolist()` or D2H copy returns when the queue
drains, so the op that syncs is the one open at the gap's start) and the one that launched the work ending it.
Ops are named by their stack of profiler ranges: the bench's `bench:<phase>` and `trl:<method>` ranges and
torch's outermost `aten::` op, on the thread holding the most ranges (the training loop; autograd's backward
thread holds fewer). Prints idle time by phase, then the largest (wait -> launch) pairs.

The profiler slows the host, so the gaps bound an unprofiled step's from above: on an H100 the profiled step idled
0.9 s, the unprofiled steps about 0.2 s (bench/RESULTS.md, fifth session). Read them for where, not how much.
"""
from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
RANGE_CATEGORIES = {"cpu_op", "user_annotation"}


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as handle:
        return json.load(handle)["traceEvents"]


def busy_intervals(events: list[dict]) -> list[tuple[float, float]]:
    """Union of the GPU's work intervals (µs), sorted and merged."""
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                   if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES)
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def idle_gaps(busy: list[tuple[float, float]], min_us: float) -> list[tuple[float, float]]:
    """Holes between consecutive busy intervals, at least min_us long."""
    return [(a[1], b[0]) for a, b in zip(busy, busy[1:]) if b[0] - a[1] >= min_us]


def main_thread_ranges(events: list[dict]) -> list[tuple[float, float, str]]:
    """(start, end, name) of the CPU ranges on the thread that holds the most of them (the training loop)."""
    by_thread: dict = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in RANGE_CATEGORIES:
            by_thread[(e.get("pid"), e.get("tid"))].append((e["ts"], e["ts"] + e.get("dur", 0), e["name"]))
    return sorted(max(by_thread.values(), key=len)) if by_thread else []


def stacks_at(ranges: list[tuple[float, float, str]], times: list[float]) -> dict[float, list[str]]:
    """The ranges open at each time, outermost first (one sweep: ranges on one thread nest)."""
    open_ranges: list[tuple[float, float, str]] = []
    found, i = {}, 0
    for t in sorted(set(times)):
        while i < len(ranges) and ranges[i][0] <= t:
            while open_ranges and open_ranges[-1][1] < ranges[i][0]:
                open_ranges.pop()
            open_ranges.append(ranges[i])
            i += 1
        while open_ranges and open_ranges[-1][1] < t:
            open_ranges.pop()
        found[t] = [name for start, end, name in open_ranges if start <= t <= end]
    return found


def label(names: list[str], depth: int = 3) -> str:
    """A stack as bench/trl ranges (innermost `depth`) then the outermost torch op; '-' if none."""
    marked = [n for n in names if n.startswith(("bench:", "trl:"))]
    ops = [n for n in names if not n.startswith(("bench:", "trl:"))]
    return " > ".join(marked[-depth:] + ops[:1]) or "-"


def launch_times(events: list[dict]) -> dict[int, float]:
    """Correlation id -> host time of the runtime call that enqueued that GPU work."""
    return {e["args"]["correlation"]: e["ts"] for e in events
            if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}


def next_work_launch(events_gpu: list[tuple[float, int]], launches: dict[int, float], t: float) -> float | None:
    """Host launch time of the first GPU work starting at or after t."""
    i = bisect.bisect_left(events_gpu, (t, -1))
    return launches.get(events_gpu[i][1]) if i < len(events_gpu) else None


def analyse(events: list[dict], min_us: float = 20.0) -> dict:
    busy = busy_intervals(events)
    if not busy:
        return {"window_s": 0.0, "busy_s": 0.0, "idle_s": 0.0, "gaps": 0, "by_phase": {}, "by_pair": {}}
    gaps = idle_gaps(busy, min_us)
    launches = launch_times(events)
    gpu_starts = sorted((e["ts"], e.get("args", {}).get("correlation", -1)) for e in events
                        if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES)
    launched = [next_work_launch(gpu_starts, launches, end) for _, end in gaps]
    stacks = stacks_at(main_thread_ranges(events), [s for s, _ in gaps] + [t for t in launched if t is not None])
    by_phase: dict = defaultdict(float)
    by_pair: dict = defaultdict(lambda: [0, 0.0])
    for (start, end), launched_at in zip(gaps, launched):
        seconds = (end - start) / 1e6
        waiting = label(stacks[start])
        launcher = label(stacks[launched_at]) if launched_at is not None else "-"
        by_phase[waiting.split(" > ")[0]] += seconds
        pair = by_pair[(waiting, launcher)]
        pair[0] += 1
        pair[1] += seconds
    window = (busy[-1][1] - busy[0][0]) / 1e6
    busy_s = sum(b - a for a, b in busy) / 1e6
    return {"window_s": window, "busy_s": busy_s, "idle_s": window - busy_s, "gaps": len(gaps),
            "gap_s": sum(b - a for a, b in gaps) / 1e6, "by_phase": dict(by_phase),
            "by_pair": {k: tuple(v) for k, v in by_pair.items()}}


def report(result: dict, top: int = 20) -> str:
    lines = [f"GPU window {result['window_s']:.3f} s: busy {result['busy_s']:.3f} s, idle {result['idle_s']:.3f} s "
             f"({result['gaps']} gaps over the threshold: {result.get('gap_s', 0.0):.3f} s)", "",
             "| idle while the host was in | s |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in sorted(result["by_phase"].items(), key=lambda kv: -kv[1])]
    lines += ["", "| GPU ran dry while the host was in | next work launched from | gaps | s |", "|---|---|---|---|"]
    pairs = sorted(result["by_pair"].items(), key=lambda kv: -kv[1][1])[:top]
    lines += [f"| {w} | {l} | {n} | {s:.3f} |" for (w, l), (n, s) in pairs]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trace", help="Chrome trace from torch.profiler (.json or .json.gz)")
    parser.add_argument("--min-us", type=float, default=20.0, help="shortest idle gap counted, in µs")
    parser.add_argument("--top", type=int, default=20)
    cli = parser.parse_args()
    print(report(analyse(load(cli.trace), cli.min_us), cli.top), end="")


if __name__ == "__main__":
    main()
