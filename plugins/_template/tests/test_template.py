import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import inpaint_template as plugin  # rename: your module (the one line of this file to change)
import pytest
from pydantic import ValidationError

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_logs_the_greeting_with_the_job_id(caplog):
    caplog.set_level(logging.INFO, logger=plugin.__name__)
    job = SimpleNamespace(id="job-7", options=lambda name: plugin.Options(greeting="hi") if name == plugin.NAME
                          else None)
    plugin.inpaint_job_finished(job=job, result=SimpleNamespace(images=[object()]))
    assert "hi from job job-7 (1 image(s))" in caplog.text
    with pytest.raises(ValidationError):
        plugin.Options.model_validate({"greting": "typo"})


@pytest.mark.parametrize("request_plugins", [{plugin.NAME: True}, {plugin.NAME: {}}, {}],
                         ids=["true", "empty object", "no entry"])
def test_the_hook_gets_options_with_their_defaults_however_a_request_turns_it_on(request_plugins):
    """The worker's own option check: `job.options(NAME)` is what it returns for the plugin."""
    from worker.plugins import Plugins

    plugins = Plugins(load_entry_points=False, builtins=())
    plugins.register(plugin, name=plugin.NAME)
    assert plugins.check_options(request_plugins)[plugin.NAME] == plugin.Options()
    assert plugins.check_options({plugin.NAME: {"greeting": "hi"}})[plugin.NAME].greeting == "hi"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_pyproject_installs_this_module_under_its_name():
    """The renames a copy needs agree: the entry point is `NAME = "<module>"`, and the module is installed."""
    import tomllib

    project = tomllib.loads(PYPROJECT.read_text())
    assert project["project"]["entry-points"]["inpaint_worker"] == {plugin.NAME: plugin.__name__}, \
        "pyproject.toml's [project.entry-points.inpaint_worker] must read NAME = \"<module>\" (NAME as in the module)"
    assert project["tool"]["setuptools"]["py-modules"] == [plugin.__name__], \
        "pyproject.toml's py-modules must list the module, or pip installs a plugin that cannot be imported"
