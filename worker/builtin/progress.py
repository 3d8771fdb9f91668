"""Progress: each denoising step goes to the job's tracker, which throttles what it reports."""

from __future__ import annotations

from ..hooks import hookimpl


@hookimpl
def inpaint_step_end(job, step: int, total_steps: int) -> None:
    job.tracker.step(job.image_index, job.image_count, step, total_steps)
