"""The distributions' metadata: what pip shows (or warns about) when it installs them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
PYPROJECTS = [ROOT / "pyproject.toml", *sorted(ROOT.glob("plugins/*/pyproject.toml"))]
SPDX_SETUPTOOLS = (77,)  # the first setuptools that takes `license = "<SPDX expression>"` without a warning


def setuptools_floor(build_requires: list[str]) -> tuple[int, ...]:
    spec = next(r for r in build_requires if re.match(r"setuptools\b", r))
    floor = re.search(r">=\s*([\d.]+)", spec)
    assert floor, f"{spec!r}: the build needs a setuptools floor"
    return tuple(int(part) for part in floor.group(1).split("."))


@pytest.mark.parametrize("path", PYPROJECTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_licence_is_an_spdx_expression_that_setuptools_builds_without_a_warning(path):
    # a table ({text = ...}) or a License classifier makes setuptools print a deprecation warning on every install
    data = tomllib.loads(path.read_text())
    project = data["project"]
    assert not isinstance(project.get("license"), dict), f"{path}: use license = \"Apache-2.0\" (SPDX)"
    assert not any(c.startswith("License ::") for c in project.get("classifiers", [])), path
    if isinstance(project.get("license"), str):
        assert setuptools_floor(data["build-system"]["requires"]) >= SPDX_SETUPTOOLS, path


def test_the_service_is_apache_licensed():
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"
