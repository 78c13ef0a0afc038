"""dvc.yaml declares what each stage reads, so a stage whose code changes reruns.

A static walk (ast; nothing is imported, so no torch) finds, for each stage, the project modules its `python -m`
module imports, transitively (in-function imports, `from x import y`, relative imports included), the project files
its code names by path (KNOWN_PATH_READS, PARAM_PATHS) and the params sections it reads (`params.<section>.<key>`).
Each must be covered by the stage's `deps` (a folder covers the files under it) or `params`. A dep that no longer
exists, or a project module listed that the stage does not import, is an error too.

Simplifications, each a deliberate choice: an empty `__init__.py` runs no code and is left out (one that gains code
is then required); a section handed whole to a function of the same module counts only the keys that function
reads from its argument; `evaluation.sets.${item.set}` covers reading `evaluation.sets[set]` in a matrix stage.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "grpo_gsm8k")
READ_ROOTS = ("configs", "presets", "data")  # tracked folders a stage could read by path; results/, models/ are outs

# Project paths written in a stage's code (found by `named_paths`), with the stages that read them; a path named in
# a module some stage imports but does not read from is listed with the stages that do. Today no stage module
# names one: the data folder and the accelerate config reach the stages as params (PARAM_PATHS), and presets/ is
# read by grpo_gsm8k.tools.preset, which no stage imports (presets become params through `dvc exp run -S`).
KNOWN_PATH_READS: dict[str, set[str]] = {}
# Params whose value is a project path a stage reads: (stage, dotted param, the attribute the stage's code reads).
PARAM_PATHS = [
    ("data", "data.source", "source"),  # a local folder of train.jsonl/test.jsonl (or a hub id)
    ("model", "model.source", "source"),  # a local folder or .gguf (or a hub id / pypi: spec)
    ("train", "train.accelerate_config", "accelerate_config"),  # `accelerate launch --config_file`
]


# ---- the static walk -------------------------------------------------------------------------------------------

def module_file(root: Path, name: str) -> Path | None:
    """`grpo_gsm8k.io` -> grpo_gsm8k/io.py (or a package's __init__.py); None outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(root: Path, path: Path) -> set[str]:
    """Every module name an import statement anywhere in `path` may load (`from a import b` may load a.b)."""
    package = module_name(root, path) if path.name == "__init__.py" else module_name(root, path).rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # `from . import x`, `from ..a import b`: relative to this module's package
                parent = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def files_loaded(root: Path, name: str) -> list[Path]:
    """Importing a.b.c runs a/__init__.py, a/b/__init__.py and a/b/c.py; empty __init__.py files run nothing."""
    parts = name.split(".")
    found = (module_file(root, ".".join(parts[:i])) for i in range(1, len(parts) + 1))
    return [f for f in found if f is not None and (f.name != "__init__.py" or f.read_text().strip())]


def import_closure(root: Path, module: str) -> set[Path]:
    """The project files that running `python -m module` loads, found without importing anything."""
    todo, seen = files_loaded(root, module), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(root, path):
            todo.extend(files_loaded(root, name))
    return seen


def named_paths(path: Path) -> set[str]:
    """String constants in `path` naming a project path under READ_ROOTS: "configs/x.yaml", or `... / "presets"`."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    joined = {id(n.right) for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            first = node.value.split("/")[0]
            if first in READ_ROOTS and ("/" in node.value or id(node) in joined):
                found.add(node.value)
    return found


def attribute_names(path: Path) -> set[str]:
    return {n.attr for n in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(n, ast.Attribute)}


# ---- params read: `params.<section>[.<key>]` -------------------------------------------------------------------

def params_sections(root: Path) -> set[str]:
    """The fields of grpo_gsm8k.params.Params, read from its source."""
    tree = ast.parse((root / "grpo_gsm8k" / "params.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Params")
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}


def _is_params(node: ast.AST) -> bool:
    """`params`, `x.params` or `load_params(...)`: an expression holding the whole Params."""
    return (isinstance(node, ast.Name) and node.id == "params") or \
        (isinstance(node, ast.Attribute) and node.attr == "params") or \
        (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "load_params")


def _keys_read(func: ast.FunctionDef, arg: str) -> set[str] | None:
    """The attributes `func` reads from its argument `arg`; None when it also uses the argument whole."""
    keys = [n.attr for n in ast.walk(func)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == arg]
    uses = [n for n in ast.walk(func) if isinstance(n, ast.Name) and n.id == arg]
    return set(keys) if keys and len(keys) == len(uses) else None


def _passed_to(tree: ast.Module, section_node: ast.AST, parents: dict) -> tuple[ast.FunctionDef, str] | None:
    """(function, parameter) when `section_node` is an argument of a call to a function defined in this module."""
    call = parents.get(id(section_node))
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        return None
    func = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == call.func.id), None)
    if func is None:
        return None
    names = [a.arg for a in func.args.args]
    if section_node in call.args and call.args.index(section_node) < len(names):
        return func, names[call.args.index(section_node)]
    keyword = next((k.arg for k in call.keywords if k.value is section_node), None)
    return (func, keyword) if keyword in names else None


def params_read(root: Path, path: Path) -> set[str]:
    """Dotted params `path` reads: `params.train` -> "train", `params.model.dtype` -> "model.dtype"."""
    sections = params_sections(root)
    tree = ast.parse(path.read_text(), str(path))
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    read = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr in sections and _is_params(node.value)):
            continue
        outer = parents.get(id(node))
        if isinstance(outer, ast.Attribute) and outer.value is node:  # params.model.dtype
            read.add(f"{node.attr}.{outer.attr}")
            continue
        target = _passed_to(tree, node, parents)
        keys = _keys_read(*target) if target else None
        read.update({f"{node.attr}.{k}" for k in keys} if keys else {node.attr})
    return read


def param_covered(dotted: str, declared: list[str]) -> bool:
    """`model` covers `model.dtype`; `evaluation.sets.${item.set}` covers `evaluation.sets` (one set per stage)."""
    for entry in declared:
        entry = entry.split(".${item.")[0] if ".${item." in entry else entry
        if entry == "params.yaml:" or dotted == entry or dotted.startswith(entry + "."):
            return True
    return False


# ---- dvc.yaml ------------------------------------------------------------------------------------------------

def expanded_stages(root: Path) -> dict[str, dict]:
    """dvc.yaml's stages, a matrix stage once per item (`${item.x}` substituted from params.yaml)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((root / "params.yaml").read_text()) or {}
    out = {}
    for name, stage in stages.items():
        matrix = stage.get("matrix")
        if not matrix:
            out[name] = stage
            continue
        (key, values), = matrix.items()  # one axis is all the pipeline uses
        ref = re.fullmatch(r"\$\{(.+)\}", str(values))
        if ref:
            values = params
            for part in ref.group(1).split("."):
                values = values[part]
        for item in values:  # a mapping iterates its keys, as DVC's matrix does
            text = yaml.safe_dump(stage).replace("${item.%s}" % key, str(item))
            # params keep `${item.x}`: param_covered reads it as "this stage's own item"
            out[f"{name}@{item}"] = {**yaml.safe_load(text), "params": stage.get("params", [])}
    return out


def dep_paths(stage: dict) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]


def param_entries(stage: dict) -> list[str]:
    return [p if isinstance(p, str) else f"{next(iter(p))}:" for p in stage.get("params", [])]


def out_paths(stages: dict) -> list[str]:
    return [o if isinstance(o, str) else next(iter(o)) for s in stages.values()
            for o in [*s.get("outs", []), *s.get("metrics", [])]]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def stage_module(stage: dict) -> str:
    found = re.search(r"python -m ([\w.]+)", stage["cmd"])
    assert found, f"cmd {stage['cmd']!r} is not `python -m <module>`; this test finds a stage's code through it"
    return found.group(1)


def gaps(root: Path) -> list[str]:
    """One line per problem: a stage, the file or param, and why."""
    stages = expanded_stages(root)
    outs, problems = out_paths(stages), []
    for name, stage in stages.items():
        deps, base = dep_paths(stage), name.split("@")[0]
        closure = import_closure(root, stage_module(stage))
        needed = {p.relative_to(root).as_posix(): "imported" for p in closure}
        for path in sorted(closure):
            for literal in named_paths(path):
                readers = KNOWN_PATH_READS.get(literal)
                if readers is None:
                    problems.append(f"stage {name}: {path.relative_to(root)} names project path {literal!r}, which "
                                    "KNOWN_PATH_READS in tests/test_dvc_deps.py does not list; add it there and "
                                    "to the deps of the stages that read it")
                elif base in readers:
                    needed[literal] = f"named in {path.relative_to(root)}"
        values = yaml.safe_load((root / "params.yaml").read_text()) or {}
        for reader, dotted, attr in PARAM_PATHS:
            if reader == base and any(attr in attribute_names(p) for p in closure):
                value = values
                for part in dotted.split("."):
                    value = (value or {}).get(part)
                if isinstance(value, str) and (root / value).exists():
                    needed[Path(value).as_posix()] = f"named by param {dotted}"
        for path, why in sorted(needed.items()):
            if not covered(path, deps):
                problems.append(f"stage {name}: {path} ({why}) is not covered by its deps in dvc.yaml")
        for dep in deps:
            on_disk = (root / dep).exists() or any(covered(o, [dep]) or covered(dep, [o]) for o in outs)
            if not on_disk:
                problems.append(f"stage {name}: dep {dep} does not exist and no stage outputs it; remove it")
            elif dep.endswith(".py") and dep.split("/")[0] in PACKAGES and dep not in needed:
                problems.append(f"stage {name}: dep {dep} is not imported by {stage_module(stage)}; remove it")
        declared = param_entries(stage)
        reads = set().union(*(params_read(root, p) for p in closure))
        for dotted in sorted(reads):
            if not param_covered(dotted, declared):
                problems.append(f"stage {name}: its code reads param {dotted}, not covered by its params in dvc.yaml")
    return problems


# ---- the walk itself, on small made-up projects ----------------------------------------------------------------

def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize("files, expected", [
    # a top-level import, and an import inside a function (imported lazily, still loaded when called)
    ({"stages/s.py": "from grpo_gsm8k.a import f\ndef g():\n    from grpo_gsm8k import b\n",
      "grpo_gsm8k/a.py": "", "grpo_gsm8k/b.py": ""}, {"stages/s.py", "grpo_gsm8k/a.py", "grpo_gsm8k/b.py"}),
    # transitive, relative (`from . import`, `from .x import`), `import a.b`, an unused module left out
    ({"stages/s.py": "import grpo_gsm8k.a\n", "grpo_gsm8k/a.py": "from . import b\nfrom .c import x\n",
      "grpo_gsm8k/b.py": "", "grpo_gsm8k/c.py": "", "grpo_gsm8k/unused.py": ""},
     {"stages/s.py", "grpo_gsm8k/a.py", "grpo_gsm8k/b.py", "grpo_gsm8k/c.py"}),
    # a package __init__.py with code is loaded by any import of the package; third-party imports are ignored
    ({"stages/s.py": "import torch\nfrom grpo_gsm8k.a import f\n", "grpo_gsm8k/__init__.py": "X = 1\n",
      "grpo_gsm8k/a.py": "import numpy\n"}, {"stages/s.py", "grpo_gsm8k/__init__.py", "grpo_gsm8k/a.py"}),
    # an empty __init__.py runs nothing; a cycle ends
    ({"stages/__init__.py": "", "stages/s.py": "from grpo_gsm8k import a\n", "grpo_gsm8k/a.py": "import stages.s\n"},
     {"stages/s.py", "grpo_gsm8k/a.py"}),
])
def test_import_closure(tmp_path, files, expected):
    root = write(tmp_path, files)
    assert {p.relative_to(root).as_posix() for p in import_closure(root, "stages.s")} == expected


@pytest.mark.parametrize("code, expected", [
    ('X = "configs/accelerate/ddp.yaml"\n', {"configs/accelerate/ddp.yaml"}),
    ('D = Path(__file__).parent / "presets"\n', {"presets"}),
    ('"""Reads configs/a.yaml."""\nrow = {"data": 1}\n', set()),  # a docstring, a dict key: no path
])
def test_named_paths(tmp_path, code, expected):
    (tmp_path / "m.py").write_text(code)
    assert named_paths(tmp_path / "m.py") == expected


PARAMS_PY = "class Params:\n    seed: int\n    model: M\n    train: T\n    evaluation: E\n"


@pytest.mark.parametrize("code, expected", [
    ("def run(params):\n    return params.model.dtype, params.seed\n", {"model.dtype", "seed"}),
    ("def run(params):\n    return asdict(params.train)\n", {"train"}),  # a section used whole
    # a section handed to a function of the module counts the keys that function reads
    ("def run(model):\n    return model.source, model.revision\n"
     "def main(a):\n    run(load_params(a.params).model)\n", {"model.source", "model.revision"}),
    ("def run(model):\n    return asdict(model)\n"
     "def main(a):\n    run(model=load_params(a.params).model)\n", {"model"}),
    ("def f(inputs):\n    return inputs.params.evaluation.sets[name], args.params\n", {"evaluation.sets"}),
])
def test_params_read(tmp_path, code, expected):
    root = write(tmp_path, {"grpo_gsm8k/params.py": PARAMS_PY, "m.py": code})
    assert params_read(root, root / "m.py") == expected


@pytest.mark.parametrize("dotted, declared, ok", [
    ("model.dtype", ["model"], True),
    ("model", ["model.source"], False),
    ("model.dtype", ["model.source"], False),
    ("evaluation.sets", ["evaluation.sets.${item.set}"], True),
    ("seed", ["params.yaml:"], True),
])
def test_param_covered(dotted, declared, ok):
    assert param_covered(dotted, declared) is ok


def test_gaps_name_stage_and_file(tmp_path):
    """Missing, stale and unimported deps, an unlisted path and an undeclared param, each named with its stage."""
    root = write(tmp_path, {
        "stages/s.py": "from grpo_gsm8k.a import f\ndef run(params):\n    return params.seed, params.model.dtype\n",
        "grpo_gsm8k/a.py": 'from grpo_gsm8k import b\nP = "configs/other.yaml"\n', "grpo_gsm8k/b.py": "",
        "grpo_gsm8k/unused.py": "", "grpo_gsm8k/params.py": PARAMS_PY, "params.yaml": "seed: 1\n",
        "dvc.yaml": yaml.safe_dump({"stages": {"s": {"cmd": "python -m stages.s", "params": ["seed"], "deps": [
            "stages/s.py", "grpo_gsm8k/a.py", "grpo_gsm8k/gone.py", "grpo_gsm8k/unused.py"]}}}),
    })
    assert gaps(root) == [
        "stage s: grpo_gsm8k/a.py names project path 'configs/other.yaml', which KNOWN_PATH_READS in "
        "tests/test_dvc_deps.py does not list; add it there and to the deps of the stages that read it",
        "stage s: grpo_gsm8k/b.py (imported) is not covered by its deps in dvc.yaml",
        "stage s: dep grpo_gsm8k/gone.py does not exist and no stage outputs it; remove it",
        "stage s: dep grpo_gsm8k/unused.py is not imported by stages.s; remove it",
        "stage s: its code reads param model.dtype, not covered by its params in dvc.yaml",
    ]
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())
    dvc["stages"]["s"].update(deps=["stages/s.py", "grpo_gsm8k"], params=["seed", "model"])
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc))
    assert gaps(root) == [gaps(root)[0]]  # a folder dep covers its modules; only the unlisted path remains


# ---- the real pipeline ---------------------------------------------------------------------------------------

def test_known_path_reads_are_still_in_the_code():
    named = set().union(*(named_paths(p) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")))
    assert not set(KNOWN_PATH_READS) - named, "KNOWN_PATH_READS lists paths no module names any more; remove them"
    assert all((REPO / p).exists() for p in KNOWN_PATH_READS), "a path in KNOWN_PATH_READS does not exist"


def test_dvc_yaml_deps_and_params_cover_what_each_stage_reads():
    problems = gaps(REPO)
    assert not problems, f"{len(problems)} gaps between the stages' code and dvc.yaml:\n" + "\n".join(problems)
