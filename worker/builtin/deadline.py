"""The deadline: a job past `deadline_s` (or the worker's cap) stops at the next denoising step.

It ends before the images and `result.json` are written; previews from earlier steps stay. Decoding,
postprocessing and uploads get `INPAINT_DEADLINE_MARGIN_S` more: a job past it when postprocessing
starts writes nothing either, and no storage retry starts after it (`retries.retry_until`).
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


@hookimpl(tryfirst=True)
def inpaint_postprocess(job) -> None:
    if time.monotonic() > job.stop_at:  # the margin is for decoding and uploads; past it Redis may hand the job on
        raise DeadlineExceeded(f"the job passed its deadline of {job.deadline_s:g} s and the margin after it "
                               "(INPAINT_DEADLINE_MARGIN_S) before its outputs were written; no result was written")
