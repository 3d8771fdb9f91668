import logging
from types import SimpleNamespace

import pytest
from inpaint_template import Options, inpaint_job_finished
from pydantic import ValidationError


def test_logs_the_greeting_with_the_job_id(caplog):
    caplog.set_level(logging.INFO, logger="inpaint_template")
    job = SimpleNamespace(id="job-7", options=lambda name: Options(greeting="hi"))
    inpaint_job_finished(job=job, result=SimpleNamespace(images=[object()]))
    assert "hi from job job-7 (1 image(s))" in caplog.text
    with pytest.raises(ValidationError):
        Options.model_validate({"greting": "typo"})
