"""The library's folders say what may import what (ARCHITECTURE.md), and there is no import cycle.

Read statically (ast, as tests/test_dvc_deps.py does): every import statement of every module, in functions too.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests.test_dvc_deps import REPO, imported_names, module_file, module_name

LIBRARY = REPO / "grpo_gsm8k"
HEAVY = {"torch", "triton", "transformers", "trl", "peft", "accelerate", "datasets", "dvc", "dvclive"}
# package (a module's dotted name up to its room) -> the project rooms it may import
ALLOWED = {
    "grpo_gsm8k.science": {"grpo_gsm8k.science", "grpo_gsm8k.contracts"},
    "grpo_gsm8k.contracts": set(),
    "grpo_gsm8k.io": set(),
    "grpo_gsm8k.params": {"grpo_gsm8k.science"},
    "grpo_gsm8k.fastgen": {"grpo_gsm8k.fastgen", "grpo_gsm8k.modeling"},
    "grpo_gsm8k.modeling": set(),
    "grpo_gsm8k.generation": {"grpo_gsm8k.fastgen", "grpo_gsm8k.params", "grpo_gsm8k.science"},  # answer_set grades
    "grpo_gsm8k.answering": {"grpo_gsm8k.contracts", "grpo_gsm8k.generation", "grpo_gsm8k.io", "grpo_gsm8k.modeling",
                             "grpo_gsm8k.params", "grpo_gsm8k.science"},
    "grpo_gsm8k.training": {"grpo_gsm8k.training", "grpo_gsm8k.science", "grpo_gsm8k.fastgen", "grpo_gsm8k.io",
                            "grpo_gsm8k.modeling", "grpo_gsm8k.contracts"},
    "grpo_gsm8k.tools": {"grpo_gsm8k.tools", "grpo_gsm8k.science", "grpo_gsm8k.contracts", "grpo_gsm8k.io",
                         "grpo_gsm8k.params"},
}

PLUMBING_OUTSIDE = {"torch", "transformers", "peft", "huggingface_hub", "tqdm"}
# room -> the packages outside the standard library it may import (ARCHITECTURE.md's last column); tools: any
OUTSIDE = {
    "grpo_gsm8k.science": {"numpy", "pandas", "scipy", "statsmodels", "matplotlib", "seaborn", "markdown",
                           "math_verify"},
    "grpo_gsm8k.contracts": set(),
    "grpo_gsm8k.io": set(),
    "grpo_gsm8k.params": {"yaml"},
    "grpo_gsm8k.fastgen": {"torch", "triton"},
    "grpo_gsm8k.modeling": PLUMBING_OUTSIDE,
    "grpo_gsm8k.generation": PLUMBING_OUTSIDE,
    "grpo_gsm8k.answering": PLUMBING_OUTSIDE,
    "grpo_gsm8k.training": {"torch", "transformers", "trl", "accelerate", "dvclive", "fsspec"},
}


def room(name: str) -> str:
    """The entry of ALLOWED a dotted module name belongs to: its package folder, or the module itself."""
    return next(key for key in sorted(ALLOWED, key=len, reverse=True) if name == key or name.startswith(key + "."))


def library_modules() -> dict[str, Path]:
    return {module_name(REPO, path): path for path in sorted(LIBRARY.rglob("*.py"))
            if path.name != "__init__.py" or path.read_text().strip()}


def project_imports(path: Path) -> set[str]:
    """The project modules `path` imports (resolved to modules that exist, not packages or names inside them)."""
    found = set()
    for name in imported_names(REPO, path):
        target = module_file(REPO, name)
        if target is not None and target.name != "__init__.py":
            found.add(module_name(REPO, target))
    return found


def outside_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names - {"grpo_gsm8k", "stages", "tests"}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each as the path that closes it (depth-first search)."""
    found, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": set()}, []),
    ({"a": {"b"}, "b": {"a"}}, [["a", "b", "a"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c", "a"]]),
    ({"a": {"a"}}, [["a", "a"]]),
])
def test_cycles(graph, expected):
    assert cycles(graph) == expected


def test_every_library_module_has_a_room():
    assert all(room(name) for name in library_modules())


def test_library_imports_follow_the_rooms():
    broken = []
    for name, path in library_modules().items():
        allowed = ALLOWED[room(name)]
        for target in sorted(project_imports(path)):
            if target.startswith("stages") or room(target) not in allowed | {room(name)}:
                broken.append(f"{name} imports {target}")
    assert not broken, "\n".join(broken)


def test_science_is_pure():
    heavy = {name: sorted(outside_imports(path) & HEAVY) for name, path in library_modules().items()
             if room(name) == "grpo_gsm8k.science"}
    assert heavy and not any(heavy.values()), heavy


def test_outside_imports_follow_the_rooms():
    broken = []
    for name, path in library_modules().items():
        allowed = OUTSIDE.get(room(name))
        outside = outside_imports(path) - set(sys.stdlib_module_names) - {"__future__"}
        if allowed is not None and outside - allowed:
            broken.append(f"{name} imports {sorted(outside - allowed)}")
    assert not broken, "\n".join(broken)


def test_no_import_cycle():
    graph = {name: project_imports(path) for name, path in library_modules().items()}
    assert not cycles(graph), cycles(graph)


def test_library_files_over_300_lines_say_why():
    long_files = [path for path in LIBRARY.rglob("*.py") if len(path.read_text().splitlines()) > 300]
    unexplained = [str(path.relative_to(REPO)) for path in long_files
                   if "over 300 lines" not in (ast.get_docstring(ast.parse(path.read_text())) or "")]
    assert not unexplained, unexplained
