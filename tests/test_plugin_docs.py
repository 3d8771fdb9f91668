"""The hook docs cannot drift: every hookspec is documented with its exact signature and has a test of its own."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from worker import hooks

ROOT = Path(__file__).parent.parent
HOOKS = sorted(name for name in dir(hooks) if name.startswith("inpaint_"))


def signature(name: str) -> str:
    return f"{name}({', '.join(inspect.signature(getattr(hooks, name)).parameters)})"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_exact_signature(hook):
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert f"### `{signature(hook)}`" in docs, f"docs/plugins.md has no section for {signature(hook)}"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test_of_its_own(hook):
    tests = "".join(path.read_text() for path in (ROOT / "tests").glob("test_*.py"))
    named = re.findall(r"^def (test_\w+)", tests, re.M)
    assert any(hook.removeprefix("inpaint_") in name for name in named), f"no test named after {hook}"


def test_the_docs_list_no_hook_that_does_not_exist():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    documented = set(re.findall(r"^### `(inpaint_\w+)\(", docs, re.M))
    assert documented == set(HOOKS)
