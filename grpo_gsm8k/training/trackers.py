"""train.report_to as GRPOConfig gets it: the experiment trackers transformers reports to beside dvclive (which the
train stage always runs, training/live_log.py).

A name transformers does not know, or a tracker that is not installed, is one error line when the stage starts;
transformers would otherwise fail only when Trainer builds its callbacks, after the model has loaded. Both lists
come from transformers itself, so they follow its version: INTEGRATION_TO_CALLBACK is the table Trainer looks
names up in, and get_available_reporting_integrations() is the installed subset that report_to="all" would pick.
"""
from __future__ import annotations

from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations


def tracker_names(report_to: str | list[str]) -> list[str]:
    """["tensorboard", ...] from "none", one name or a list; ValueError naming train.report_to and the fix."""
    names = [] if report_to == "none" else [report_to] if isinstance(report_to, str) else list(report_to)
    installed = get_available_reporting_integrations() if names else []
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            known = ", ".join(sorted(INTEGRATION_TO_CALLBACK))
            raise ValueError(f"train.report_to: {name!r} is not a tracker transformers supports (one of: {known}); "
                             "fix the name or set train.report_to: none")
        if name not in installed:
            raise ValueError(f"train.report_to: {name!r} is not installed; pip install {name}, or set "
                             "train.report_to: none")
    return names
