"""Where one CPU GRPO step spends its time and memory: the train stage's own trainer (stages.train.build_trainer)
on a params file, with TRL's phases timed (rollout generation, old/ref log-probs + rewards, loss forward, backward
+ optimizer) and the process's RSS sampled every 50 ms.

    python -m grpo_gsm8k.tools.preset cpu --write /tmp/cpu.yaml
    python bench/profile_cpu_step.py --params /tmp/cpu.yaml --model models/base --data data/prepared/train.jsonl

Run it after the model and data stages (it reads their outputs); it writes checkpoints nowhere that matters
(a temporary folder) and prints one table row per step.
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

from grpo_gsm8k.training.speedups import speed_up_training
from grpo_gsm8k.params import load_params
from stages.train import build_trainer

GIB = 2 ** 30


class RssSampler(threading.Thread):
    """Peak RSS of this process since the last reset(), sampled (ru_maxrss cannot be reset)."""

    def __init__(self, every_s: float = 0.05):
        super().__init__(daemon=True)
        self.process, self.every_s, self.peak = psutil.Process(), every_s, 0

    def run(self) -> None:
        while True:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.every_s)

    def reset(self) -> int:
        peak, self.peak = self.peak, self.process.memory_info().rss
        return peak


def timed(owner, name: str, seconds: dict, peaks: dict, sampler: RssSampler) -> None:
    """Wrap owner.name so each call adds its wall time and the RSS peak it reached."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        sampler.reset()
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - start
            peaks[name] = max(peaks[name], sampler.reset())
    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--masked-attention", action="store_true",
                        help="HF's masked SDPA instead of the packed causal attention (an A/B)")
    parser.add_argument("--untrimmed", action="store_true", help="TRL's padded layout in log-prob forwards (an A/B)")
    args = parser.parse_args()
    params = load_params(args.params)
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, max_steps=args.steps,
                                                                   save_steps=10 ** 6))
    sampler = RssSampler()
    sampler.start()
    seconds, peaks = defaultdict(float), defaultdict(int)
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(params, args.model, args.data, Path(out), callbacks=[])
        speed_up_training(trainer, compile_layers=None if params.train.compile == "auto" else params.train.compile,
                          packed_attention=not args.masked_attention, trimmed=not args.untrimmed)
        print(f"loaded: rss {sampler.reset() / GIB:.2f} GiB")
        # TRL 1.16: _generate = rollouts; _generate_and_score_completions also scores (old logps, rewards).
        for name in ("_generate", "_generate_and_score_completions", "_compute_loss"):
            timed(trainer, name, seconds, peaks, sampler)
        timed(trainer.accelerator, "backward", seconds, peaks, sampler)
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start
    print(f"{args.steps} steps in {total:.1f} s ({total / args.steps:.1f} s/step); "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB")
    print("| phase | s total | peak RSS GiB |")
    for name in seconds:
        print(f"| {name} | {seconds[name]:.1f} | {peaks[name] / GIB:.2f} |")


if __name__ == "__main__":
    main()
