"""One inpainting job, top to bottom: validate, fetch, preprocess, generate, postprocess, write, result.

The pipeline, plugins, input fetcher, output sink and progress reporter are handed in, so
the same job runs in `inpaint-worker run` on a laptop and in a Celery worker.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, partial
from importlib.metadata import version
from typing import Any

import torch
from PIL import Image
from pydantic import BaseModel

from .adapters import plan_adapters, use_adapters
from .checks import check_ready, refuse_non_finite, replaced_latents, same_images
from .errors import InternalError, InvalidRequest, JobError, OutOfMemory
from .inputs import Fetcher, decode_image, load_tensor
from .io_pool import at_once
from .limits import Limits
from .model import LoadedModel, free_memory, generator
from .outputs import CONTENT_TYPES, EXTENSIONS, OutputSink, encode_output, put_all, remove
from .plugins import JobHooks, Plugins
from .redaction import redacted
from .retries import retry_until
from .schema import (
    REFERENCE_FIELDS,
    AdapterRef,
    AdapterUsed,
    EffectiveParameters,
    ImageOutput,
    InpaintRequest,
    InpaintResult,
    parse_request,
    steps_run,
)
from .settings import Settings
from .tracking import Reporter, Tracker, no_reporter

log = logging.getLogger(__name__)
PIPELINE_FIELDS = ("height", "width", "padding_mask_crop", "strength", "num_inference_steps", "sigmas",
                   "true_cfg_scale", "guidance_scale", "attention_kwargs", "max_sequence_length")
DISTILLED_GUIDANCE_SCALE = 1.0  # the pipeline spec's default; upstream's None fails on a guidance-distilled model


@dataclass
class Job:
    """The mutable context plugins see: edit `image`, `mask` and `params` in preprocess hooks."""

    id: str
    request: InpaintRequest
    limits: Limits
    tracker: Tracker
    deadline_s: float
    deadline: float  # time.monotonic() after which denoising stops
    stop_at: float  # the deadline plus INPAINT_DEADLINE_MARGIN_S: no output is written, nor a retry started, after it
    plugin_options: dict[str, Any]
    plugins: list[str]
    params: dict[str, Any]
    image: Image.Image | None = None
    mask: Image.Image | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    items: list[tuple[int, int]] = field(default_factory=list)  # (prompt index, seed) for each output image
    image_index: int = 0
    state: dict[str, Any] = field(default_factory=dict)  # scratch space for plugins
    cancel_requested: Callable[[], bool] = lambda: False
    worker: dict[str, Any] = field(default_factory=dict)  # node, queue wait: recorded in the result
    settings: Settings | None = None  # the worker's settings (read them; a job changes none)
    pipe: Any = None  # the pipeline, for plugins that need its parts (e.g. previews use the VAE)
    sink: OutputSink | None = None  # where this job's files go; plugins may add their own (previews)
    adapters: list[AdapterRef | dict] = field(default_factory=list)  # LoRAs from the library: preprocess hooks may edit
    adapters_used: list[AdapterUsed] = field(default_factory=list)  # what ran: name, sha256, scale, shift
    scheduler_shift: float | None = None  # the schedule the adapters ask for (fast mode's); None: the model's own

    @property
    def image_count(self) -> int:
        return len(self.items)

    @property
    def steps_run(self) -> int:
        """The steps the pipeline runs, by `params` (a preprocess hook may change the schedule)."""
        return steps_run(self.params["num_inference_steps"], self.params["strength"])

    @property
    def output_size(self) -> tuple[int, int]:
        """The size of the images the job returns: the processing size, or with padding_mask_crop the input's (the
        pipeline pastes the processed crop back into the input)."""
        if self.params["padding_mask_crop"] is None:
            return self.params["width"], self.params["height"]
        return self.image.size

    @property
    def true_cfg(self) -> bool:
        """True CFG runs only with true_cfg_scale > 1 and a negative prompt: upstream is silent otherwise."""
        negative = self.request.negative_prompt is not None or self.request.negative_prompt_embeds is not None
        return self.params["true_cfg_scale"] > 1 and negative  # fast mode turns it off

    def options(self, plugin: str) -> BaseModel | dict[str, Any]:
        """This job's options for `plugin`: its `Options` model, validated with defaults filled in (also for
        `"name": true` or no entry); for a plugin without an `Options` model, the request's dict (`{}` for true)."""
        options = self.plugin_options.get(plugin, {})
        return options if options is not True else {}


def run(request: dict | InpaintRequest, *, model: LoadedModel, plugins: Plugins, fetcher: Fetcher,
        sink: OutputSink, settings: Settings, reporter: Reporter = no_reporter,
        cancel_requested: Callable[[], bool] | None = None, job_id: str | None = None,
        worker: dict[str, Any] | None = None) -> InpaintResult:
    """Run one job to the end; raise a `JobError` (with its code) if it fails."""
    job = start(parse_request(request), model, plugins, settings, Tracker(reporter, settings.progress_interval_s),
                job_id)
    job.cancel_requested = cancel_requested or job.cancel_requested
    job.worker = {"node": socket.gethostname(), **(worker or {})}
    job.pipe, job.sink = model.pipe, sink
    hooks = plugins.for_job([name for name, on in job.request.plugins.items() if on is False])
    retrying = retry_until.set(job.stop_at)
    try:
        job.tracker.enter("fetching")
        load_inputs(job, fetcher)
        job.tracker.enter("preprocessing")
        hooks.call("inpaint_preprocess", job=job)
        use_adapters(job, model)
        job.items = plan_images(job.request, check_ready(job, model))
        job.tracker.plan(job.image_count, job.steps_run, job.params["width"] * job.params["height"])
        images = generate(job, model, hooks)
        job.tracker.enter("postprocessing")
        images = hooks.chain("inpaint_postprocess", "images", images, same_images, job=job)
        job.tracker.enter("uploading")
        result = write_outputs(job, model, images, sink)
        hooks.notify("inpaint_job_finished", job=job, result=result)
        return result
    except JobError as raised:  # no local outlives the except clause: no reference cycle through this frame
        failed(job, raised, model, hooks)
        raise
    except Exception as raised:
        raise failed(job, raised, model, hooks) from raised
    finally:
        retry_until.reset(retrying)


def start(request: InpaintRequest, model: LoadedModel, plugins: Plugins, settings: Settings, tracker: Tracker,
          job_id: str | None) -> Job:
    limits = Limits(settings.max_pixels, settings.max_steps, settings.max_images, settings.max_deadline_s,
                    model.size_factor)
    limits.check(request)
    options = plugins.check_options(request.plugins)
    deadline_s = request.deadline_s or settings.max_deadline_s
    params = {name: getattr(request, name) for name in PIPELINE_FIELDS}
    params["guidance_scale"] = guidance_scale(request, model)
    adapters = plan_adapters(request, settings, params)  # fast mode: its adapter, steps, no true CFG
    return Job(id=job_id or request.job_id or uuid.uuid4().hex, request=request, limits=limits, tracker=tracker,
               deadline_s=deadline_s, deadline=tracker.started + deadline_s,
               stop_at=tracker.started + deadline_s + settings.deadline_margin_s, plugin_options=options,
               plugins=[name for name in plugins.names if request.plugin_enabled(name)], params=params,
               settings=settings, adapters=adapters)


def guidance_scale(request: InpaintRequest, model: LoadedModel) -> float | None:
    """What the pipeline gets: a guidance-distilled model needs a value (1.0 unless asked); any other ignores it,
    so it gets none (upstream would only warn that it is ignored)."""
    if not model.guidance_distilled:
        return None
    return DISTILLED_GUIDANCE_SCALE if request.guidance_scale is None else request.guidance_scale


def load_inputs(job: Job, fetcher: Fetcher) -> None:
    """Fetch every input at once (each can be a network round trip), then decode them in order."""
    refs = {name: getattr(job.request, name) for name in REFERENCE_FIELDS}
    refs = {name: ref for name, ref in refs.items() if ref is not None}
    fetched = dict(zip(refs, at_once(*(partial(fetcher.fetch, ref, name) for name, ref in refs.items())),
                       strict=True))
    job.image = decode_image(fetched.pop("image").result(), "image")
    job.mask = decode_image(fetched.pop("mask_image").result(), "mask_image")
    for name, data in fetched.items():
        job.tensors[name] = load_tensor(data.result(), name)


def plan_images(request: InpaintRequest, prompts: int) -> list[tuple[int, int]]:
    """One (prompt index, seed) per output image: image k of a job gets seed k of `seed`, or seed + k."""
    count = prompts * request.num_images_per_prompt
    if isinstance(request.seed, list):
        if len(request.seed) != count:
            raise InvalidRequest("seed", f"has {len(request.seed)} seeds for {count} images; give one int or one "
                                 "seed per image")
        seeds = request.seed
    else:
        base = request.seed if request.seed is not None else random.SystemRandom().randrange(2**62)
        seeds = [(base + k) % 2**63 for k in range(count)]  # each a valid seed to ask for again
    return [(k // request.num_images_per_prompt, seeds[k]) for k in range(count)]


def generate(job: Job, model: LoadedModel, hooks: JobHooks) -> list[Any]:
    """One pipeline call per image, each exactly what that (prompt, seed) gives alone.

    Upstream's batched path pairs prompt masks with the wrong prompts when prompts differ
    in length, and shares one VAE sample across generators; one call per image avoids both,
    and costs little on a GPU that one 1024x1024 image already fills.
    """
    marker = model.pipe.transformer.register_forward_pre_hook(lambda *_: job.tracker.enter("denoising"))
    try:
        outputs = []
        for index, (prompt_index, seed) in enumerate(job.items):
            job.image_index = index
            job.tracker.enter("encoding")
            with model.pipe.mask_grid_as(job.request.mask_grid), model.pipe.scheduler_shift_as(job.scheduler_shift):
                result = model.pipe(**pipeline_kwargs(job, prompt_index, seed),
                                    callback_on_step_end=step_callback(job, hooks),
                                    callback_on_step_end_tensor_inputs=["latents"])
            images = result.images  # PIL images, or a tensor of packed latents for output_type latent
            outputs.extend(images.split(1) if isinstance(images, torch.Tensor) else images)
        return outputs
    finally:
        marker.remove()


def pipeline_kwargs(job: Job, prompt_index: int, seed: int) -> dict[str, Any]:
    request, t = job.request, job.tensors
    kwargs = dict(job.params, image=job.image, mask_image=job.mask, generator=generator(seed),
                  num_images_per_prompt=1, output_type="latent" if request.output_type == "latent" else "pil")
    if not job.true_cfg:  # no CFG runs: the scale and any negative prompt go unused, and upstream would warn of it
        kwargs["true_cfg_scale"] = 1.0  # on every such job (the result's parameters.true_cfg says what ran)
    if "prompt_embeds" in t:
        kwargs["prompt_embeds"] = t["prompt_embeds"][prompt_index:prompt_index + 1]
        if "prompt_embeds_mask" in t:
            kwargs["prompt_embeds_mask"] = t["prompt_embeds_mask"][prompt_index:prompt_index + 1]
    else:
        kwargs["prompt"] = pick(request.prompt, prompt_index)
    if job.true_cfg and "negative_prompt_embeds" in t:
        row = prompt_index if t["negative_prompt_embeds"].shape[0] > 1 else 0
        kwargs["negative_prompt_embeds"] = t["negative_prompt_embeds"][row:row + 1]
        if "negative_prompt_embeds_mask" in t:
            kwargs["negative_prompt_embeds_mask"] = t["negative_prompt_embeds_mask"][row:row + 1]
    elif job.true_cfg and request.negative_prompt is not None:
        kwargs["negative_prompt"] = pick(request.negative_prompt, prompt_index)
    if "latents" in t:
        row = job.image_index if t["latents"].shape[0] > 1 else 0
        kwargs["latents"] = t["latents"][row:row + 1]
    if "masked_image_latents" in t:
        kwargs["masked_image_latents"] = t["masked_image_latents"]
    return kwargs


def pick(value: str | list[str], index: int) -> str:
    return value[index] if isinstance(value, list) else value


def step_callback(job: Job, hooks: JobHooks):
    """Bridge diffusers' `callback_on_step_end` to the `inpaint_step_end` hook."""
    total, finite = job.steps_run, []

    def on_step_end(pipe: Any, i: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        tensors["latents"] = hooks.chain("inpaint_step_end", "latents", tensors["latents"], replaced_latents,
                                         job=job, step=i + 1, total_steps=total, timestep=timestep)
        finite.append(torch.isfinite(tensors["latents"]).all())  # read once, after the last step: no sync each step
        if i + 1 == total:
            refuse_non_finite(job, finite)
            job.tracker.enter("decoding")
        return tensors

    return on_step_end


def write_outputs(job: Job, model: LoadedModel, images: list[Any], sink: OutputSink) -> InpaintResult:
    """Store the images at once, then `result.json`: it exists only once everything it lists does."""
    request = job.request
    if len(images) != job.image_count:
        raise InternalError(f"postprocess hooks returned {len(images)} images for {job.image_count}")
    content_type, extension = CONTENT_TYPES[request.output_type], EXTENSIONS[request.output_type]
    names = [f"{index}.{extension}" for index in range(len(images))]
    addresses = put_all(sink, [(name, encode_output(image, request.output_type, request.output.quality), content_type)
                               for name, image in zip(names, images, strict=True)])
    outputs = []
    for index, (image, (prompt_index, seed), (location, url)) in enumerate(zip(images, job.items, addresses,
                                                                                strict=True)):
        size = image.size if isinstance(image, Image.Image) else (None, None)
        outputs.append(ImageOutput(index=index, location=location, url=url, content_type=content_type,
                                   width=size[0], height=size[1], seed=seed, prompt_index=prompt_index))
    width, height = job.output_size
    result = InpaintResult(
        job_id=job.id,
        images=outputs,
        parameters=EffectiveParameters(
            width=width, height=height, processing_width=job.params["width"], processing_height=job.params["height"],
            num_inference_steps=job.params["num_inference_steps"], strength=job.params["strength"],
            steps_run=job.steps_run, true_cfg=job.true_cfg, true_cfg_scale=job.params["true_cfg_scale"],
            guidance_scale=job.params["guidance_scale"] if model.guidance_distilled else None,
            padding_mask_crop=job.params["padding_mask_crop"], mask_grid=request.mask_grid, mode=request.mode,
            adapters=job.adapters_used, images=len(outputs),
            seeds=[s for _, s in job.items], output_type=request.output_type, plugins=job.plugins),
        timings=job.tracker.finish(),
        model=model.describe(),
        worker={**job.worker, "device": device_name(model), "versions": dict(versions())},
    )
    record = {**result.model_dump(mode="json"), "request": redacted(request.model_dump(mode="json",
                                                                                        exclude_none=True))}
    try:
        sink.put("result.json", json.dumps(record, indent=2).encode(), CONTENT_TYPES["json"])
    except Exception:
        remove(sink, names)  # no images without their record
        raise
    return result


def device_name(model: LoadedModel) -> str:
    """The device, with the physical GPU a pinned worker sees as cuda:0."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{model.device} (CUDA_VISIBLE_DEVICES={visible})" if model.device.type == "cuda" and visible else str(
        model.device)


@cache
def versions() -> dict[str, str]:
    """Read once a process: installed versions do not change under a running worker (and reading costs ms)."""
    return {name: version(dist) for name, dist in
            (("worker", "qwen-inpaint-worker"), ("diffusers", "diffusers"), ("torch", "torch"))}


def failed(job: Job, raised: Exception, model: LoadedModel, hooks: JobHooks) -> JobError:
    """The job's error, told to the plugins; then the failed call's memory is let go.

    The tracebacks of `raised` and its causes hold the frames of the failed call (its tensors among their locals),
    and frames that caught an exception and kept it (pluggy's, a `raise ... from`) form reference cycles only a full
    garbage collection frees: on a GPU the next job could run out of memory for memory nothing uses. Clearing the
    frames lets that memory go at once; the tracebacks still show where the error was raised.
    """
    error = as_job_error(raised)
    hooks.notify("inpaint_job_failed", job=job, error=error)  # a raising hook never hides the job's error
    forget_locals(raised)
    if isinstance(error, OutOfMemory):
        free_memory(model.device)
    return error


def forget_locals(error: BaseException) -> None:
    """Clear the frames of `error`'s traceback and of the errors it was raised from (frames still running are left)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def as_job_error(error: BaseException) -> JobError:
    if isinstance(error, JobError):
        return error
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
        return OutOfMemory(f"the accelerator ran out of memory: {str(error).splitlines()[0][:300]}; "
                           "try a smaller size, fewer images or an offload mode")
    log.exception("job failed with an unexpected error")
    return InternalError(f"{type(error).__name__}: {error}")


