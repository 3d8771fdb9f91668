"""A plugin the queue tests install into their workers (via PYTHONPATH): slow steps, a run log, failures on demand.

Options per job under `plugins.testkit`: `step_s` (sleep per step, standing in for a big model's
step), `raise` (raise RuntimeError with this text), `oom` (raise torch's OutOfMemoryError),
`drop_images` (return no images from postprocess), `nan_at_step` (turn the latents to NaN
at that step), `upload_s` (each output written takes this long). Every run appends its job id to $TESTKIT_RUN_LOG.
"""

import os
import time

from worker.hooks import hookimpl


@hookimpl
def inpaint_preprocess(job):
    path = os.environ.get("TESTKIT_RUN_LOG")
    if path:
        with open(path, "a") as log:
            log.write(job.id + "\n")
    upload_s = job.options("testkit").get("upload_s")
    if upload_s and job.sink is not None:  # a slow S3: each object written takes this long
        put = job.sink.put
        job.sink.put = lambda *args, **kwargs: (time.sleep(upload_s), put(*args, **kwargs))[1]


@hookimpl
def inpaint_step_end(job, step, latents):
    options = job.options("testkit")
    if options.get("nan_at_step") == step:  # what an overflow in the model leaves
        return {"latents": latents * float("nan")}
    if options.get("raise"):
        raise RuntimeError(options["raise"])
    if options.get("oom"):
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    time.sleep(options.get("step_s", 0))


@hookimpl
def inpaint_postprocess(job, images):
    return [] if job.options("testkit").get("drop_images") else None


@hookimpl
def inpaint_job_finished(job):
    path = os.environ.get("TESTKIT_RUN_LOG")
    if path:
        with open(path, "a") as log:
            log.write(f"done:{job.id}\n")
