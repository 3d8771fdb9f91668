"""Cancellation: a running job stops at the next denoising step once a cancel was requested.

Cooperative by design: Celery's revoke does not stop a running task in any pool, and
diffusers' `_interrupt` still decodes. Raising here ends the job before its images and `result.json`
are written (previews stored at earlier steps stay where they are); a cancel that comes during the
last step or decoding is seen before postprocessing.
"""

from __future__ import annotations

from ..errors import Cancelled
from ..hooks import hookimpl


@hookimpl(tryfirst=True)
def inpaint_step_end(job, step: int, total_steps: int) -> None:
    if job.cancel_requested():
        image = f" of image {job.image_index + 1} of {job.image_count}" if job.image_count > 1 else ""
        raise Cancelled(f"cancelled at step {step} of {total_steps}{image}; no result was written")


@hookimpl(tryfirst=True)
def inpaint_postprocess(job) -> None:
    if job.cancel_requested():  # asked for during the last step or decoding: still nothing is written
        raise Cancelled("cancelled after denoising; no result was written")
