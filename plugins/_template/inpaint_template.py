"""The smallest working plugin: one option, one hook. Copy this folder to start your own (see README.md)."""

from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict

from worker.hooks import hookimpl

NAME = "template"  # rename: the entry-point name in pyproject.toml, which requests use in "plugins"
log = logging.getLogger(__name__)  # the module's name: "inpaint_template" here


class Options(BaseModel):
    """A job's `"plugins": {"template": {...}}`, validated when the job starts; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    greeting: str = "hello"


@hookimpl
def inpaint_job_finished(job, result) -> None:
    """Called after a job's outputs are written. Take only the keyword arguments you need (without defaults)."""
    # always an `Options`, validated, defaults filled in: for `"template": {...}`, `"template": true` and no entry
    options: Options = job.options(NAME)
    log.info("%s from job %s (%d image(s))", options.greeting, job.id, len(getattr(result, "images", [])))
