"""The house in order: no import circle among the rooms of worker/, and each room says what it holds."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent.parent / "worker"
MODULES = sorted(WORKER.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(WORKER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The worker modules `path` imports, anywhere in it (lazy imports in functions too), but for those under
    `if TYPE_CHECKING:`, which never run."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for branch in ast.walk(tree)
                   if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
                   for node in ast.walk(branch)}
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def graph() -> dict[str, set[str]]:
    names = {module_name(path) for path in MODULES}
    return {module_name(path): (imports(path) & names) - {module_name(path)} for path in MODULES}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, trail = [], {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        trail.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                found.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target)
        trail.pop()
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module)
    return found


def test_the_circle_finder_finds_a_circle():  # errors and schema imported each other until 2026-12
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_no_import_circle_in_worker():
    assert graph()["worker.job"] >= {"worker.checks", "worker.schema"}  # the graph is read at all
    assert circles(graph()) == []


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(WORKER)))
def test_each_room_says_what_it_holds(path):
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert docstring and len(docstring.splitlines()[0]) > 20, f"{path.name}: a first line that says what it holds"


def test_the_readmes_layout_names_every_room():
    """README.md's Layout table, the map a newcomer reads first, lists each module of worker/ (and builtin/)."""
    readme = (WORKER.parent / "README.md").read_text()
    table = readme[readme.index("## Layout"):].split("\n## ", 1)[0]
    named = set(re.findall(r"`(?:worker/)?([a-z_]+\.py|builtin/)`", table))
    rooms = {path.name for path in WORKER.glob("*.py") if path.name != "__init__.py"} | {"builtin/"}
    assert rooms - named == set(), "rooms missing from the README's Layout"
    assert named - rooms == set(), "the README's Layout names rooms that are gone"


@pytest.mark.parametrize(("old", "name", "new"), [
    ("worker.schema", "redacted", "worker.redaction"), ("worker.schema", "Limits", "worker.limits"),
    ("worker.pipeline", "load_model", "worker.model"), ("worker.pipeline", "LoadedModel", "worker.model"),
    ("worker.inpaint_pipeline", "InpaintPipeline", "worker.pipeline"),
    ("worker.inpaint_pipeline", "speed_up", "worker.speed"),
])
def test_a_name_that_moved_still_imports_from_its_old_room_with_a_deprecation_warning(old, name, new):
    """Plugins and scripts written before the rooms were split keep working, and are told where the name lives."""
    import importlib

    with pytest.deprecated_call(match=f"{old}.{name} is deprecated: import it from {new}"):
        found = getattr(importlib.import_module(old), name)
    assert found is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        importlib.import_module(old).nothing_here  # noqa: B018 (an unknown name is still an AttributeError)

