"""Seconds per GRPO optimizer step on 1..N GPUs (DDP through `accelerate launch`), same effective batch.

    python bench/bench_multi_gpu.py --gpus 1,2 --steps 6                 # on nvidia-h100-x2, through the device tool
    python bench/bench_multi_gpu.py --gpus 1,2 --steps 1 --tiny --cpu    # CPU smoke test (gloo, 2 processes)

The study's effective batch stays 24 completions per optimizer step (6 generations per prompt): each of the N
processes keeps per_device_train_batch_size=6 and gradient_accumulation_steps becomes 4/N, as stages/train.py does.
Each process generates its own share (24/N completions) with its own generator, then DDP all-reduces the LoRA
gradients. Model, tokenizer, dataset and trainer come from bench_grpo_step.run_engine (imported, not copied), so
the shape is the single-GPU bench's: Llama-3.1-8B architecture, random bf16 weights, LoRA r=16 all-linear, 256-token
completions, beta=0. N=1 is launched as one plain process (no DDP wrapper: the real single-GPU baseline); N>1 as
`accelerate launch --multi_gpu --num_processes N --mixed_precision bf16`.

Per N: the median of the steps after the first (each rank times its own steps; the slowest rank's median is
reported), speed-up vs N=1, scaling efficiency (speed-up / N), peak allocated GiB on each GPU, and the rank-0 phase
medians. Printed and appended to $OUT/bench_multi_gpu.md (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

# NVLink multicast must stay off on the lent machines (KINDS.md); children inherit the environment.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class _Prefixed:
    """Prefix each line a rank prints, so interleaved output from several ranks stays readable."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.pending = stream, prefix, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        if lines:  # whole lines in one write each, so ranks do not interleave inside a line
            self.stream.write("".join(f"{self.prefix}{line}\n" for line in lines))
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def child(cli) -> None:
    """One rank: pin its GPU before the model is built, then run bench_grpo_step's engine with accum = total / N."""
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=cli.cpu)  # initialises the process group (NCCL on GPUs, gloo with --cpu)
    if torch.cuda.is_available() and not cli.cpu:
        torch.cuda.set_device(state.local_process_index)  # build_model allocates on the *current* device
    n, rank = state.num_processes, state.process_index  # TrainingArguments re-creates the state later
    if cli.total_accum % n:
        raise SystemExit(f"gradient_accumulation_steps {cli.total_accum} is not divisible by {n} processes")
    sys.stdout = _Prefixed(sys.stdout, f"[r{rank}] ")

    import bench_grpo_step

    cli.accum = cli.total_accum // n
    result = bench_grpo_step.run_engine(cli.engine, cli)
    result.update(rank=rank, world=n, accum=cli.accum,
                  device=torch.cuda.get_device_name() if torch.cuda.is_available() and not cli.cpu else "cpu")
    result.pop("fastgen_chunks", None)
    print(f"fastgen/summary: {json.dumps(result)}", flush=True)
    # the parent reads the result from a file: several ranks share one stdout pipe
    Path(cli.result_dir, f"rank{rank}.json").write_text(json.dumps(result))


def launch(n: int, cli, timeout: float) -> tuple[list[dict], str]:
    """Run one configuration in fresh processes; returns the per-rank results and a status word."""
    import tempfile

    result_dir = tempfile.mkdtemp(prefix=f"bench_multi_gpu_n{n}_")
    argv = ["--child", f"--engine={cli.engine}", f"--steps={cli.steps}", f"--per-device={cli.per_device}",
            f"--total-accum={cli.total_accum}", f"--gens={cli.gens}", f"--max-completion={cli.max_completion}",
            f"--beta={cli.beta}", f"--lora-dropout={cli.lora_dropout}", f"--profile-step={cli.profile_step}",
            f"--out={cli.out}", f"--result-dir={result_dir}"] + (["--tiny"] if cli.tiny else []) + (["--cpu"] if cli.cpu else [])
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes", str(n),
                "--dynamo_backend", "no", "--main_process_port", str(cli.port + n),
                "--mixed_precision", "no" if cli.cpu else "bf16"]
    if n > 1:  # the GPU invocation also with --cpu (no GPU there: the ranks fall back to gloo), so it is tested
        launcher += ["--multi_gpu", "--gpu_ids", ",".join(map(str, range(n)))]
    else:
        launcher += ["--gpu_ids", "0"]
    command = launcher + [str(Path(__file__).resolve()), *argv]
    print(f"\n=== N={n}: {' '.join(command)}", flush=True)
    env = {**os.environ, **SAFE_ENV, "PYTHONUNBUFFERED": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    if cli.cpu:
        env["ACCELERATE_USE_CPU"] = "1"  # else TrainingArguments rebuilds a non-distributed state on a CPU host
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    import threading

    def pump():  # stream the ranks' output as it comes
        for line in proc.stdout:
            print(line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status = "ok"
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout:.0f}s"
        os.killpg(proc.pid, 9)  # the launcher's own process group (start_new_session), nothing else
        code = proc.wait()
    reader.join(timeout=10)
    results = [json.loads(f.read_text()) for f in sorted(Path(result_dir).glob("rank*.json"))]
    if status == "ok" and (code or len(results) != n):
        status = f"failed (exit {code}, {len(results)}/{n} ranks reported)"
    print(f"=== N={n}: {status}", flush=True)
    return results, status


def row(n: int, ranks: list[dict], base: float | None) -> dict:
    s_step = max(r["s_per_step"] for r in ranks)  # ranks meet at every all-reduce; take the slowest
    speedup = base / s_step if base else None
    r0 = min(ranks, key=lambda r: r["rank"])
    return {"n": n, "s_per_step": s_step, "speedup": speedup, "efficiency": speedup / n if speedup else None,
            "peak_gib": [round(r["peak_gib"], 1) for r in sorted(ranks, key=lambda r: r["rank"])],
            "accum": r0["accum"], "steps": {r["rank"]: r["steps"] for r in ranks},
            "phases": {p: r0[p] for p in ("generation", "scoring", "forward", "backward", "optimizer")},
            "tokens_per_step_rank0": r0["tokens_per_step"], "engine": r0["engine"], "device": r0["device"]}


def table(rows: list[dict], cli) -> str:
    head = ("| N GPUs | per-device × accum × N | s/step (median, steps 2+) | speed-up vs N=1 | scaling efficiency | "
            "peak GiB per GPU | generation | fwd+loss | backward | optimizer |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    lines = [f"| {r['n']} | {cli.per_device} × {r['accum']} × {r['n']} | {r['s_per_step']:.2f} | "
             f"{fmt(r['speedup'], '.2f')}× | {fmt(r['efficiency'] and 100 * r['efficiency'], '.0f')}% | "
             f"{' / '.join(f'{g:.1f}' for g in r['peak_gib'])} | {r['phases']['generation']:.2f} | "
             f"{r['phases']['forward']:.2f} | {r['phases']['backward']:.2f} | {r['phases']['optimizer']:.3f} |"
             for r in rows]
    return head + "\n".join(lines) + "\n"


def versions() -> str:
    import accelerate
    import peft
    import torch
    import transformers
    import trl

    return (f"{time.strftime('%Y-%m-%d %H:%M')} · torch {torch.__version__} · transformers {transformers.__version__}"
            f" · trl {trl.__version__} · peft {peft.__version__} · accelerate {accelerate.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", default="1,2", help="process counts to run, e.g. 1,2 or 1,2,4")
    parser.add_argument("--engine", default="fast", help="fast | trl | trl-static (bench_grpo_step's engines)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--per-device", type=int, default=6)
    parser.add_argument("--total-accum", type=int, default=4, help="accumulation at N=1; each N runs total/N")
    parser.add_argument("--gens", type=int, default=6)
    parser.add_argument("--max-completion", type=int, default=256)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="the anchors used 0; the study 0.05")
    parser.add_argument("--profile-step", type=int, default=0, help="torch.profiler over this step (1-based)")
    parser.add_argument("--tiny", action="store_true", help="tiny random model: checks the script, on CPU too")
    parser.add_argument("--cpu", action="store_true", help="run the processes on CPU (gloo); with --tiny")
    parser.add_argument("--port", type=int, default=29600)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per configuration")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds from now after which no further configuration starts / runs on")
    parser.add_argument("--fallback-engine", default=None,
                        help="if --engine fails at some N>1, rerun every N with this engine (e.g. trl), time allowing")
    parser.add_argument("--fallback-steps", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", default=None, help=argparse.SUPPRESS)
    cli, _ = parser.parse_known_args() if "--child" in sys.argv else (parser.parse_args(), None)
    if cli.child:
        child(cli)
        return
    for key, value in SAFE_ENV.items():
        os.environ[key] = value
    start = time.monotonic()
    counts = [int(n) for n in cli.gpus.split(",") if n]

    def run_all(engine: str, steps: int) -> tuple[list[dict], dict[int, str]]:
        cli.engine, cli.steps = engine, steps
        rows, statuses, base = [], {}, None
        for n in counts:
            timeout = cli.timeout
            if cli.deadline is not None:
                timeout = min(timeout, cli.deadline - (time.monotonic() - start))
                if timeout < 30:
                    statuses[n] = "skipped (deadline)"
                    print(f"=== N={n} [{engine}]: skipped, deadline reached", flush=True)
                    continue
            ranks, statuses[n] = launch(n, cli, timeout)
            if statuses[n] != "ok":
                continue
            r = row(n, ranks, base)
            if n == 1:
                base = r["s_per_step"]
                r["speedup"], r["efficiency"] = 1.0, 1.0
            rows.append(r)
            print("PARTIAL " + json.dumps(r), flush=True)
        return rows, statuses

    report = ""
    attempts = [(cli.engine, cli.steps)]
    while attempts:
        engine, steps = attempts.pop(0)
        rows, statuses = run_all(engine, steps)
        card = rows[0]["device"] if rows else "?"
        report += (f"\n### bench_multi_gpu · engine {engine} · {card} · {versions()}\n\n"
                   f"{table(rows, cli) if rows else '(no configuration finished)'}\n"
                   + "".join(f"- N={n}: {statuses[n]}\n" for n in counts if statuses.get(n, 'ok') != "ok")
                   + "".join(f"- N={r['n']}: per-step seconds by rank {r['steps']}; completion tokens per step "
                             f"on rank 0: {r['tokens_per_step_rank0']:.0f}\n" for r in rows))
        failed_multi = any(n > 1 and statuses.get(n) != "ok" for n in counts)
        if failed_multi and cli.fallback_engine and engine != cli.fallback_engine:
            attempts.append((cli.fallback_engine, cli.fallback_steps))
    print(report, flush=True)
    Path(cli.out).mkdir(parents=True, exist_ok=True)
    with open(Path(cli.out) / "bench_multi_gpu.md", "a") as handle:
        handle.write(report)


if __name__ == "__main__":
    main()
