"""The whole pipeline on one GPU with presets/gpu-smoke.yaml, through real DVC, timed stage by stage.

    python bench/gpu_smoke.py                 # from the project root, on a CUDA machine (the device tool)
    python bench/gpu_smoke.py --no-s3         # keep checkpoints local (train.checkpoint_remote="")

What it does, in the working tree it is run in (the device tool's copy, which has no git history):
1. makes the tree a git repository with one commit if it is none (`dvc exp run` needs one; `/.gpu/` excluded);
2. puts `python` on PATH for the stage commands (the device image has only `python3`);
3. starts the project's S3 server (`grpo_gsm8k.tools.s3server`, SeaweedFS; `weed` from PATH or the venv) so the train
   stage uploads its checkpoints as in the study; if it cannot start, the run continues with
   train.checkpoint_remote="" and the report says why;
4. runs `dvc exp run $(python -m grpo_gsm8k.tools.preset gpu-smoke)`;
5. reports each stage's wall time (from DVC's "Running stage" lines to the next), the train stage's per-step times
   (TRL's logged step_time), the metrics, and the checkpoints that reached S3 (complete = manifest.json present).

Writes $OUT/gpu_smoke.md (the tables, with the card) and $OUT/gpu_smoke.log (DVC's whole output, timestamped).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python bench/gpu_smoke.py`: the project's package sits one level up
STAGE_RE = re.compile(r"Running stage '([^']+)'")
STEP_TIME_RE = re.compile(r"'step_time': '([0-9.]+)'")


def sh(*command: str, env: dict | None = None) -> str:
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {done.stdout[-1500:]}{done.stderr[-1500:]}")
    return done.stdout


def card() -> str:
    import torch

    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip() if shutil.which("nvidia-smi") else "no nvidia-smi"
    return f"{smi} · torch {torch.__version__} (CUDA {torch.version.cuda})"


def ensure_git() -> None:
    if (ROOT / ".git").exists():
        return
    if not shutil.which("git"):
        raise SystemExit("gpu_smoke: git is not installed here; `dvc exp run` needs a git repository")
    sh("git", "init", "-q")
    with open(ROOT / ".git" / "info" / "exclude", "a") as handle:
        handle.write("/.gpu/\n/.gl/\n")
    sh("git", "add", "-A")
    sh("git", "-c", "user.name=gpu-smoke", "-c", "user.email=gpu-smoke@localhost", "commit", "-qm", "gpu smoke tree")


def tool_path() -> str:
    """A folder with `python` (this interpreter) first on PATH, for dvc's stage commands."""
    folder = Path("/tmp/gpu-smoke-bin")
    folder.mkdir(exist_ok=True)
    wrapper = folder / "python"  # a script, not a symlink: a linked venv python would lose its venv
    wrapper.unlink(missing_ok=True)  # never write through an old link into the interpreter it points to
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


def start_s3(env: dict):
    """The project's S3 server on free ports, or (None, why) when it cannot start here."""
    try:
        from grpo_gsm8k.tools.s3server import S3Server, find_weed

        find_weed()
        server = S3Server(data_dir=Path("/tmp/gpu-smoke-s3"), port=0, bucket="grpo-gsm8k")
        started = time.perf_counter()
        server.start(timeout=60)
        print(f"gpu_smoke: S3 server up at {server.endpoint_url} in {time.perf_counter() - started:.1f}s", flush=True)
        env.update(server.env())
        return server, ""
    except Exception as err:  # noqa: BLE001 - any failure means: run without uploads, and say why
        return None, f"{type(err).__name__}: {err}"


def run_dvc(args: list[str], env: dict, log_path: Path) -> tuple[int, list[tuple[float, str]], float]:
    """Run dvc, echo and timestamp every output line; returns (exit code, [(seconds, line)], total seconds)."""
    start = time.perf_counter()
    lines: list[tuple[float, str]] = []
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    with open(log_path, "w") as log:
        for line in proc.stdout:
            t = time.perf_counter() - start
            lines.append((t, line.rstrip("\n")))
            log.write(f"[{t:7.1f}s] {line}")
            log.flush()
            print(f"[{t:7.1f}s] {line}", end="", flush=True)
    return proc.wait(), lines, time.perf_counter() - start


def stage_times(lines: list[tuple[float, str]], total: float) -> list[tuple[str, float]]:
    """Each stage from its "Running stage" line to the next one (the last to the end of dvc)."""
    starts = [(t, m.group(1)) for t, line in lines if (m := STAGE_RE.search(line))]
    ends = [t for t, _ in starts[1:]] + [total]
    return [(name, end - t) for (t, name), end in zip(starts, ends)]


def s3_checkpoints(server) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(**server.storage_options(), skip_instance_cache=True)
    return sorted(p.split("/")[-2] for p in fs.glob(f"{server.bucket}/checkpoints/*/checkpoint-*/manifest.json"))


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def report(cli, command: str, code: int, lines, total: float, why_no_s3: str, uploaded: list[str] | None) -> str:
    params = __import__("yaml").safe_load((ROOT / "params.yaml").read_text())
    steps = [float(m.group(1)) for _, line in lines if (m := STEP_TIME_RE.search(line))]
    out = [f"### gpu_smoke · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {card()}", "",
           f"`{command}` exit code **{code}**, {total:.0f} s in all (dvc included).", "",
           "| stage | wall s |", "|---|---|"]
    out += [f"| {name} | {seconds:.1f} |" for name, seconds in stage_times(lines, total)]
    train = params["train"]
    out.append("")
    if steps:
        later = steps[1:] or steps
        out.append(f"Train: {len(steps)} steps logged (TRL step_time): first {steps[0]:.1f} s, then median "
                   f"{statistics.median(later):.2f} s/step (min {min(later):.2f}, max {max(later):.2f}); shape "
                   f"{train['per_device_train_batch_size']} x {train['gradient_accumulation_steps']}, "
                   f"{train['num_generations']} generations, completions up to {train['max_completion_length']}, "
                   f"beta {train['beta']}, LoRA dropout {train['lora']['dropout']}.")
    summary = read_json(ROOT / "results/train/summary.json")
    if summary:
        out.append(f"Train summary: `{json.dumps(summary)}`")
    out.append("Checkpoints on S3 (with manifest): " + (", ".join(uploaded) if uploaded else "none")
               if uploaded is not None else f"S3: not used ({why_no_s3}); checkpoints stayed local.")
    for kind in ("baseline", "evaluate"):
        for name in params["evaluation"]["sets"]:
            m = read_json(ROOT / f"results/{kind}/{name}/metrics.json")
            if m:
                out.append(f"- {kind} {name}: accuracy {m['accuracy']:.3f} ({m['correct']}/{m['total']}), mean "
                           f"tokens {m['mean_tokens']:.0f}, truncated {m['truncated_rate']:.1%}")
    select = read_json(ROOT / "results/select.json")
    if select:
        out.append(f"- select: `{json.dumps(select)}`")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpu-smoke")
    parser.add_argument("--no-s3", action="store_true", help="keep checkpoints local (train.checkpoint_remote=\"\")")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    cli = parser.parse_args()
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": tool_path(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    ensure_git()
    server, why_no_s3 = (None, "--no-s3") if cli.no_s3 else start_s3(env)
    if server is None:  # the study's params upload to S3; without a server, train must keep checkpoints local
        params_file = ROOT / "params.yaml"
        params_file.write_text(re.sub(r"(?m)^(\s+checkpoint_remote:).*$", r'\1 ""', params_file.read_text()))
        print(f"gpu_smoke: no S3 ({why_no_s3}); train.checkpoint_remote set to \"\"", flush=True)
    preset = sh(sys.executable, "-m", "grpo_gsm8k.tools.preset", cli.preset, env=env).split()
    command = f"dvc exp run $(python -m grpo_gsm8k.tools.preset {cli.preset})"
    print(f"gpu_smoke: {command} -> dvc exp run {' '.join(preset)}", flush=True)
    code, lines, total = run_dvc(["exp", "run", *preset], env, out / "gpu_smoke.log")
    uploaded = None
    if server is not None:
        try:
            uploaded = s3_checkpoints(server)
        finally:
            server.stop()
    text = report(cli, command, code, lines, total, why_no_s3, uploaded)
    print("\n" + text, flush=True)
    with open(out / "gpu_smoke.md", "a") as handle:
        handle.write("\n" + text)
    for name in ("dvc.lock", "results/train/summary.json"):
        if (ROOT / name).is_file():
            shutil.copy(ROOT / name, out / Path(name).name)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
