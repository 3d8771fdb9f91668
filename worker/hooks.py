"""The hooks a plugin can implement: the table of contents of what a plugin can do.

Each hook receives keyword arguments; an implementation takes only the ones it needs (declared
without defaults: pluggy never passes an argument that has one). A plugin that raises (a
`sys.exit()` included), or returns something other than what its hook takes, fails the job it
ran in (`plugin_error`, naming the plugin), except that raising a `worker.errors.JobError` (e.g. `Cancelled`) ends the
job with that error. The hooks that tell of an outcome (`inpaint_job_finished`,
`inpaint_job_failed`) and `inpaint_pipeline_loaded` are the exceptions: see each.

A plugin implementing a hook not listed here (a misspelling) or a hook wrapper is reported
as failed and skipped when it loads.

The worker calls implementations one by one (worker.plugins.JobHooks) rather than through `pm.hook.name()`:
pluggy calls the last registered first, gives every implementation the same arguments (our postprocess and step
hooks chain: each sees the previous one's result), and raises a plugin's error without naming the plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # for editors and type checkers: plugins receive these, they need not import them
    from diffusers import DiffusionPipeline
    from PIL import Image

    from .errors import JobError
    from .job import Job
    from .schema import InpaintResult
    from .settings import Settings

PROJECT = "inpaint_worker"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def inpaint_pipeline_loaded(pipe: DiffusionPipeline, settings: Settings) -> None:
    """Once per worker process, after the pipeline is loaded and before the first job.

    Load LoRA weights, pick an attention backend, compile. Return nothing. A plugin that raises
    here is reported as failed and skipped (unregistered): the worker serves without it.
    """


@hookspec
def inpaint_preprocess(job: Job) -> None:
    """Before the pipeline runs, in registration order (built-ins first).

    Edit `job.image`, `job.mask` (PIL images) and `job.params` (pipeline keyword arguments,
    e.g. `height`, `width`, `strength`, `num_inference_steps`) in place; the job checks them again
    after the last hook, as it checked the request. Return nothing.
    """


@hookspec
def inpaint_step_end(job: Job, step: int, total_steps: int, timestep: Any, latents: Any) -> dict[str, Any] | None:
    """After each denoising step (bridged from diffusers' `callback_on_step_end`). Keep it cheap.

    `step` counts from 1 to `total_steps` (the steps that really run) for image `job.image_index`;
    `latents` are the packed latents, as the plugins before this one left them. Return
    `{"latents": tensor}` (the same shape, dtype and device) to replace them, or None.
    """


@hookspec
def inpaint_postprocess(job: Job, images: list[Image.Image | Any]) -> list[Image.Image | Any] | None:
    """After the pipeline, once per job with all its images (PIL, or tensors for output_type latent).

    Overlays go here. Return a new list of the same length, each item like the one it replaces
    (an image of the same size and mode; a tensor of the same shape, dtype and device), or None
    after editing in place.
    Plugins run in turn, each seeing the previous one's images.
    """


@hookspec
def inpaint_job_finished(job: Job, result: InpaintResult) -> None:
    """After the outputs are written; `result` is the `InpaintResult`. Return nothing.

    Errors raised here are logged only: the job has succeeded, and the other plugins still hear of it.
    """


@hookspec
def inpaint_job_failed(job: Job, error: JobError) -> None:
    """When a job fails from fetching its inputs on (not one refused at its first checks, or cancelled while
    queued); `error` is the `JobError` it ends with. Errors raised here are logged only, and
    the other plugins still hear of it."""
