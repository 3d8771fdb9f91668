"""The deadline: a job past `deadline_s` (or the worker's cap) stops at the next denoising step.

It ends before the images and `result.json` are written; previews from earlier steps stay.
"""

from __future__ import annotations

import time

from ..errors import DeadlineExceeded
from ..hooks import hookimpl


@hookimpl(tryfirst=True)
def inpaint_step_end(job) -> None:
    if time.monotonic() > job.deadline:
        raise DeadlineExceeded(f"the job passed its deadline of {job.deadline_s:g} s during denoising; no result "
                               "was written")
