"""Report stage: the study write-up (Markdown and self-contained HTML) from the pipeline's results.

    python -m stages.report --summary results/train/summary.json --select results/select.json \
        --baseline results/baseline --evaluate results/evaluate --stats results/stats \
        --figures reports/figures --out reports [--params params.yaml]

Reads params.yaml, results/train/summary.json (with its learning-signal diagnostics), results/select.json and,
for each evaluation set, the baseline and evaluate metrics, the stats JSON, its swaps JSON and its figures.
Writes reports/report.md and reports/report.html (figures inlined as base64) together or not at all; a missing
or stale input is one error line naming the file and the stage that writes it. Also reports/report.pdf when
`report.pdf` is true and weasyprint is installed (not a DVC output). No timestamps: the same inputs give
byte-identical files. This module reads and writes; the text is grpo_gsm8k/science/report_sections.py (sections),
report_render.py (tables) and report_format.py (number formats, HTML); the file names inside each input folder are
grpo_gsm8k/contracts.py's.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from grpo_gsm8k.contracts import (ANSWER_METRICS, ANSWER_METRICS_KEYS, SELECT_KEYS, SELECTION_FIGURE, STATS_KEYS,
                                  TRAIN_SUMMARY_KEYS, stats_files)
from grpo_gsm8k.io import atomic_file, fail, read_stage_json
from grpo_gsm8k.params import load_params
from grpo_gsm8k.science.report_format import fmt_count, render_html
from grpo_gsm8k.science.report_render import ReportInputs, SetResults
from grpo_gsm8k.science.report_sections import render_markdown

@dataclass(frozen=True)
class ReportSources:
    """The outputs the report reads, each named in dvc.yaml: the train summary, select's record, the baseline and
    evaluate folders (one <set>/ each), the stats folder and the stats figures folder (one <set>/ each)."""
    summary: Path
    select: Path
    baseline: Path
    evaluate: Path
    stats: Path
    figures: Path


def load_json(path: Path, stage: str, keys: tuple[str, ...] = ()):
    """A stage's JSON output (grpo_gsm8k.io.read_stage_json); without `keys` it must be a list (the swap rows)."""
    data = read_stage_json(path, stage, keys)
    if not keys and not isinstance(data, list):
        raise ValueError(f"{path} is not a list; it is out of date, rerun the {stage} stage (dvc repro)")
    return data


def check_counts(stats: dict, stats_path: Path, model: str, metrics: dict, metrics_path: Path) -> None:
    """The stats and the metrics must describe the same answers; otherwise one of them is stale."""
    counted, reported = stats["counts"][model], (metrics["correct"], metrics["total"])
    if (counted["correct"], counted["total"]) != reported:
        raise ValueError(f"{stats_path} counts {model} {fmt_count(counted['correct'], counted['total'])} but "
                         f"{metrics_path} says {fmt_count(*reported)}; rerun the stats stage (dvc repro)")


def load_set(name: str, sources: ReportSources, out_dir: Path) -> tuple[SetResults, dict[str, Path]]:
    stats_paths = stats_files(sources.stats, name)
    paths = {"base": sources.baseline / name / ANSWER_METRICS, "tuned": sources.evaluate / name / ANSWER_METRICS,
             "stats": stats_paths["result"]}
    base = load_json(paths["base"], "baseline", ANSWER_METRICS_KEYS)
    tuned = load_json(paths["tuned"], "evaluate", ANSWER_METRICS_KEYS)
    stats = load_json(paths["stats"], "stats", STATS_KEYS)
    swap_rows = load_json(stats_paths["swaps"], "stats")
    check_counts(stats, paths["stats"], "base", base, paths["base"])
    check_counts(stats, paths["stats"], "tuned", tuned, paths["tuned"])
    images = {}
    for figure in stats["figures"]:
        path = sources.figures / name / figure
        if not path.is_file():
            raise ValueError(f"{path} not found; the stats stage draws it (dvc repro)")
        images[figure] = path
    rel = {figure: Path(os.path.relpath(path, out_dir)).as_posix() for figure, path in images.items()}
    return SetResults(name, base, tuned, stats, swap_rows, rel), {rel[f]: images[f] for f in images}


def load_inputs(params_path: Path, sources: ReportSources, out_dir: Path) -> tuple[ReportInputs, dict]:
    """Everything the report reads, validated; returns the inputs and {relative image path: file}."""
    params = load_params(params_path)
    summary = load_json(sources.summary, "train", TRAIN_SUMMARY_KEYS)
    select = load_json(sources.select, "select", SELECT_KEYS)
    sets, images = [], {}
    for name in params.evaluation.sets:
        results_of_set, set_images = load_set(name, sources, out_dir)
        sets.append(results_of_set)
        images.update(set_images)
    figure = sources.figures / SELECTION_FIGURE
    if not figure.is_file():
        raise ValueError(f"{figure} not found; the select stage draws it (dvc repro select)")
    rel = Path(os.path.relpath(figure, out_dir)).as_posix()
    return ReportInputs(params, summary, select, sets, rel), {**images, rel: figure}


def write_pdf(out_dir: Path, html_text: str, wanted: bool) -> None:
    """report.pdf where asked for and possible; a stale one is removed so it never shows old numbers."""
    pdf = out_dir / "report.pdf"
    try:
        from weasyprint import HTML
    except (ImportError, OSError):  # OSError: weasyprint installed without its system libraries
        HTML = None
    if not wanted or HTML is None:
        pdf.unlink(missing_ok=True)
        print(f"report: {pdf} skipped ({'report.pdf is false' if not wanted else 'weasyprint is not installed'})")
        return
    with atomic_file(pdf) as tmp:
        HTML(string=html_text).write_pdf(str(tmp))


def run(params_path: Path, sources: ReportSources, out_dir: Path) -> dict[str, Path]:
    """Read every input, render, then write report.md and report.html together (nothing on bad input)."""
    inputs, images = load_inputs(Path(params_path), sources, Path(out_dir))
    md_text = render_markdown(inputs)
    html_text = render_html(md_text, {rel: path.read_bytes() for rel, path in images.items()})
    outputs = {"md": Path(out_dir) / "report.md", "html": Path(out_dir) / "report.html"}
    with contextlib.ExitStack() as stack:
        md_tmp = stack.enter_context(atomic_file(outputs["md"]))
        html_tmp = stack.enter_context(atomic_file(outputs["html"]))
        md_tmp.write_text(md_text, encoding="utf-8")
        html_tmp.write_text(html_text, encoding="utf-8")
    write_pdf(Path(out_dir), html_text, inputs.params.report.pdf)
    return outputs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--summary", type=Path, required=True, help="the train stage's summary.json")
    parser.add_argument("--select", type=Path, required=True, help="the select stage's record")
    parser.add_argument("--baseline", type=Path, required=True, help="the baseline stage's folder (<set>/ each)")
    parser.add_argument("--evaluate", type=Path, required=True, help="the evaluate stage's folder (<set>/ each)")
    parser.add_argument("--stats", type=Path, required=True, help="the stats stage's JSON folder")
    parser.add_argument("--figures", type=Path, required=True, help="the stats stage's figures (<set>/ each)")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md and report.html")
    args = parser.parse_args(argv)
    with fail():
        sources = ReportSources(args.summary, args.select, args.baseline, args.evaluate, args.stats, args.figures)
        outputs = run(args.params, sources, args.out)
    print("report:", ", ".join(str(path) for path in outputs.values()))


if __name__ == "__main__":
    main()
