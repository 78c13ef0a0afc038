"""Did the GRPO run get a learning signal? Run-level numbers from the logged curves, and a warning when it did not.

GRPO learns only from groups whose completions got different rewards (the advantage is the reward minus its group's
mean). TRL 1.16 already logs per step the share of groups without spread (`frac_reward_zero_std`), the share of
completions cut at max_completion_length (`completions/clipped_ratio`), `completions/mean_length` and each reward's
`rewards/<name>/mean|std`; training/live_log.py writes them all to dvclive. What TRL lacks, how far the adapter
moved (the norm of the LoRA update, UPDATE_NORM), training/diagnostics.py adds to the logs. The train stage puts
`signal_summary` in its summary and prints `no_signal_warning`; the report says the same in words.
"""
from __future__ import annotations

UPDATE_NORM = "lora/update_norm"
MEANS = {"zero_std_share": "frac_reward_zero_std", "clipped_share": "completions/clipped_ratio",
         "mean_completion_length": "completions/mean_length"}  # summary key -> TRL's logged name
MAX_ZERO_STD_SHARE = 0.9  # above it, too few groups carry an advantage to learn from
MIN_UPDATE_NORM = 1e-8  # Adam moves nothing when every advantage is 0 (beta 0): the norm stays exactly 0

Curves = dict[str, list[tuple[int, float]]]  # logged name -> (step, value) points


def _mean(points: list[tuple[int, float]] | None) -> float | None:
    return sum(value for _, value in points) / len(points) if points else None


def signal_summary(curves: Curves) -> dict:
    """Means over the logged steps (each step weighted alike), the last update norm, and each reward component's
    mean and spread (`rewards/<name>/mean|std`); None where nothing was logged."""
    summary = {key: _mean(curves.get(name)) for key, name in MEANS.items()}
    norms = curves.get(UPDATE_NORM)
    summary["lora_update_norm"] = norms[-1][1] if norms else None
    components = sorted({name.split("/")[1] for name in curves if name.startswith("rewards/")})
    summary["rewards"] = {name: {stat: _mean(curves.get(f"rewards/{name}/{stat}")) for stat in ("mean", "std")}
                          for name in components}
    return summary


def signal_failures(summary: dict) -> tuple[bool, bool]:
    """(flat, still): almost every group had identical rewards; the adapter did not move. Either is no signal."""
    share, norm = summary.get("zero_std_share"), summary.get("lora_update_norm")
    return share is not None and share > MAX_ZERO_STD_SHARE, norm is not None and norm < MIN_UPDATE_NORM


def no_signal_warning(summary: dict) -> str:
    """One warning line when the run had (almost) no learning signal, else ""."""
    share, norm = summary.get("zero_std_share"), summary.get("lora_update_norm")
    if not any(signal_failures(summary)):
        return ""
    share_text = "?" if share is None else f"{share:.0%}"
    norm_text = "?" if norm is None else f"{norm:.3g}"
    return (f"train: WARNING: no learning signal: {share_text} of groups had identical rewards "
            f"(frac_reward_zero_std) and the LoRA update norm is {norm_text}, so the adapter barely changed; "
            "give the groups reward spread (longer max_completion_length than reward.min_tokens, more "
            "num_generations, a prompt the model follows; see presets/cpu.yaml)")
