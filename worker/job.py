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

from .errors import InternalError, InvalidRequest, JobError, NumericalError, OutOfMemory
from .inputs import Fetcher, decode_image, load_tensor
from .io_pool import at_once, retry_until
from .outputs import CONTENT_TYPES, EXTENSIONS, MAX_SIDE, OutputSink, encode_output, put_all, remove
from .pipeline import LoadedModel, count_prompt_tokens, free_memory, generator, template_closing_tokens
from .plugins import JobHooks, Plugins
from .schema import (
    REFERENCE_FIELDS,
    EffectiveParameters,
    ImageOutput,
    InpaintRequest,
    InpaintResult,
    Limits,
    parse_request,
    redacted,
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
    pipe: Any = None  # the pipeline, for plugins that need its parts (e.g. previews use the VAE)
    sink: OutputSink | None = None  # where this job's files go; plugins may add their own (previews)

    @property
    def image_count(self) -> int:
        return len(self.items)

    @property
    def steps_run(self) -> int:
        """The steps the pipeline runs, by `params` (a preprocess hook may change the schedule)."""
        return steps_run(self.params["num_inference_steps"], self.params["strength"])

    @property
    def true_cfg(self) -> bool:
        """True CFG runs only with true_cfg_scale > 1 and a negative prompt: upstream is silent otherwise."""
        negative = self.request.negative_prompt is not None or self.request.negative_prompt_embeds is not None
        return self.request.true_cfg_scale > 1 and negative

    def options(self, plugin: str) -> Any:
        """This job's options for `plugin`: its `Options` model with defaults filled in, or the raw dict."""
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
        check_ready(job, model)
        job.tracker.plan(job.image_count, job.steps_run)
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
    return Job(id=job_id or request.job_id or uuid.uuid4().hex, request=request, limits=limits, tracker=tracker,
               deadline_s=deadline_s, deadline=tracker.started + deadline_s,
               stop_at=tracker.started + deadline_s + settings.deadline_margin_s, plugin_options=options,
               plugins=[name for name in plugins.names if request.plugin_enabled(name)], params=params)


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


def check_ready(job: Job, model: LoadedModel) -> None:
    """What can only be checked once inputs are loaded and preprocessed, before any GPU time is spent."""
    request = job.request
    check_schedule(job)
    check_sizes(job, model)
    if job.image.mode != "RGB":
        raise InvalidRequest("image", f"mode {job.image.mode} reached the pipeline; the normalize plugin converts "
                             "to RGB (is it blocked?)")
    if not job.mask.convert("L").getbbox():
        raise InvalidRequest("mask_image", "the mask is empty (all black): nothing to repaint; white marks the area "
                             "to repaint")
    check_prompt_lengths(job, model)
    prompts = check_tensors(job, model)
    job.limits.check_images(prompts * request.num_images_per_prompt)
    job.items = plan_images(request, prompts)
    if "latents" in job.tensors and job.tensors["latents"].shape[0] not in (1, len(job.items)):
        raise InvalidRequest("latents", f"has {job.tensors['latents'].shape[0]} rows for {len(job.items)} images; "
                             f"give 1 row (shared by every image) or {len(job.items)} (one per image)")


SCHEDULE = ("num_inference_steps", "strength", "sigmas")


def check_schedule(job: Job) -> None:
    """The denoising schedule, when a preprocess hook changed it in `params`, checked as the request's was."""
    schedule = {name: plain(job.params[name]) for name in SCHEDULE}  # a hook may give numpy values
    changed = [name for name in SCHEDULE if schedule[name] != getattr(job.request, name)]
    if not changed:
        return
    try:  # the request's own checks, on a request that differs from a valid one only in its schedule
        parse_request({"prompt": "-", "image": "-", "mask_image": "-", **schedule})
        job.limits.check_steps(schedule["num_inference_steps"])
    except InvalidRequest as error:
        raise InvalidRequest(error.field, f"{error.message.removeprefix(error.field + ': ')} (after a preprocess "
                             f"hook changed {', '.join(sorted(changed))} in job.params)") from None


def plain(value: Any) -> Any:
    """A numpy or torch value as the Python value it holds (lists for arrays); anything else as it is."""
    return value.tolist() if hasattr(value, "tolist") else value


def output_size(job: Job) -> tuple[int, int]:
    """The size of the images the job returns: the processing size, or with padding_mask_crop the input's (the
    pipeline pastes the processed crop back into the input)."""
    if job.params["padding_mask_crop"] is None:
        return job.params["width"], job.params["height"]
    return job.image.size


def check_sizes(job: Job, model: LoadedModel) -> None:
    """The processing size on the model's grid and within the pixel budget (what the model works at); the
    output's size (the input's, with padding_mask_crop) within what the output format can hold."""
    request, width, height = job.request, job.params["width"], job.params["height"]
    asked = "height" if request.height is not None else "width" if request.width is not None else "image"
    job.limits.check_size(width, height, asked)  # "image": the size is the input's own, scaled
    job.limits.check_side(max(width, height), asked)
    for name, value in (("width", width), ("height", height)):
        if value % model.size_factor:
            raise InvalidRequest(name, f"{value} is not a multiple of {model.size_factor} (the model's size factor)")
    out_width, out_height = output_size(job)
    side = MAX_SIDE.get(request.output_type)
    if not side or max(out_width, out_height) <= side:
        return
    if job.params["padding_mask_crop"] is None:
        side = "width" if out_width > out_height else "height"
        field, context = (side if getattr(request, side) is not None else "output_type"), ""
    else:
        set_by = "" if request.padding_mask_crop is not None else (
            ", set by a preprocess plugin (auto_crop; \"plugins\": {\"auto_crop\": false} turns it off),")
        field, context = "padding_mask_crop", f"with padding_mask_crop{set_by} the output keeps the input's size: "
    raise InvalidRequest(field, f"{context}{max(out_width, out_height)} px is over what {request.output_type} can "
                         f"hold ({side} px a side); choose output_type png")


def check_prompt_lengths(job: Job, model: LoadedModel) -> None:
    """A prompt must fit max_sequence_length with the template's closing tokens: upstream cuts the rest silently."""
    request, closing = job.request, template_closing_tokens(model)
    room = max(request.max_sequence_length - closing, 0)
    for name in ("prompt", "negative_prompt") if job.true_cfg else ("prompt",):  # an unused one is not encoded
        value = getattr(request, name)
        for text in [value] if isinstance(value, str) else value or []:
            tokens = count_prompt_tokens(model, text)
            if tokens > room:
                needed = tokens + closing
                remedy = (f"raise max_sequence_length to {needed} or shorten it" if needed <= 1024
                          else f"shorten it to {1024 - closing} tokens (max_sequence_length is at most 1024)")
                raise InvalidRequest(name, f"is {tokens} tokens; with max_sequence_length "
                                     f"{request.max_sequence_length} a prompt may have at most {room} (the "
                                     f"pipeline's chat template adds {closing} closing tokens to every prompt's "
                                     f"sequence); {remedy}")


def check_tensors(job: Job, model: LoadedModel) -> int:
    """Check each tensor's shape and dtype, cast it for the model; return the number of prompts."""
    t, request = job.tensors, job.request
    prompts = request.prompt_count
    dim = model.pipe.transformer.config.joint_attention_dim
    height, width = job.params["height"], job.params["width"]
    for name in ("prompt_embeds", "negative_prompt_embeds"):
        if name in t:
            shape = list(t[name].shape)
            if len(shape) != 3 or 0 in shape or shape[-1] != dim or not t[name].is_floating_point():
                raise InvalidRequest(name, f"shape {shape} {t[name].dtype}; expected a float tensor "
                                     f"[prompts, tokens, {dim}], none of them 0")
            if shape[1] > request.max_sequence_length:
                raise InvalidRequest(name, f"has {shape[1]} tokens, over max_sequence_length "
                                     f"({request.max_sequence_length}); raise max_sequence_length (at most 1024)")
            t[name] = t[name].to(model.device, model.dtype)
    if "prompt_embeds" in t:
        prompts = t["prompt_embeds"].shape[0]
        if isinstance(request.negative_prompt, list) and len(request.negative_prompt) != prompts:
            raise InvalidRequest("negative_prompt", f"has {len(request.negative_prompt)} entries for {prompts} "
                                 "prompts (rows of prompt_embeds); give one each")
    for name, embeds in (("prompt_embeds_mask", "prompt_embeds"),
                         ("negative_prompt_embeds_mask", "negative_prompt_embeds")):
        if name in t:
            if list(t[name].shape) != list(t[embeds].shape[:2]) or t[name].is_floating_point():
                raise InvalidRequest(name, f"shape {list(t[name].shape)} {t[name].dtype}; expected an integer "
                                     f"tensor {list(t[embeds].shape[:2])} (1 = token, 0 = padding)")
            if ((t[name] != 0) & (t[name] != 1)).any():
                raise InvalidRequest(name, f"holds {sorted(set(t[name].unique().tolist()) - {0, 1})[:5]}; each value "
                                     "is 1 (a token) or 0 (padding)")
            t[name] = t[name].to(model.device, torch.long)
    negatives = t["negative_prompt_embeds"].shape[0] if "negative_prompt_embeds" in t else 1
    if negatives not in (1, prompts):
        raise InvalidRequest("negative_prompt_embeds", f"has {negatives} rows for {prompts} prompts")
    factor = model.pipe.vae_scale_factor
    if "latents" in t:
        expected = [(height // factor // 2) * (width // factor // 2), model.latent_channels * 4]
        if t["latents"].dim() != 3 or list(t["latents"].shape[1:]) != expected:
            raise InvalidRequest("latents", f"shape {list(t['latents'].shape)}; expected packed latents "
                                 f"[1 or images, {expected[0]}, {expected[1]}] for {width}x{height}")
    if "masked_image_latents" in t:
        m = t["masked_image_latents"]
        expected = (model.latent_channels, height // factor, width // factor)
        if (m.dim() not in (4, 5) or m.shape[0] != 1 or (m.shape[1], m.shape[-2], m.shape[-1]) != expected
                or (m.dim() == 5 and m.shape[2] != 1)):
            raise InvalidRequest("masked_image_latents", f"shape {list(m.shape)}; expected [1, {expected[0]}, "
                                 f"(1,) {expected[1]}, {expected[2]}] for {width}x{height}")
    for name in ("latents", "masked_image_latents"):
        if name in t:
            if not t[name].is_floating_point():
                raise InvalidRequest(name, f"dtype {t[name].dtype}; expected a float tensor")
            t[name] = t[name].to(model.device, model.dtype)
    for name, tensor in t.items():  # cast to the model's dtype: a value too large for it is infinite now
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise InvalidRequest(name, f"holds NaN or infinite values (or values too large for the model's "
                                 f"{str(model.dtype).removeprefix('torch.')}); every value must be a finite number")
    return prompts


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
            with model.pipe.mask_grid_as(job.request.mask_grid):
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
    if "prompt_embeds" in t:
        kwargs["prompt_embeds"] = t["prompt_embeds"][prompt_index:prompt_index + 1]
        if "prompt_embeds_mask" in t:
            kwargs["prompt_embeds_mask"] = t["prompt_embeds_mask"][prompt_index:prompt_index + 1]
    else:
        kwargs["prompt"] = pick(request.prompt, prompt_index)
    if "negative_prompt_embeds" in t:
        row = prompt_index if t["negative_prompt_embeds"].shape[0] > 1 else 0
        kwargs["negative_prompt_embeds"] = t["negative_prompt_embeds"][row:row + 1]
        if "negative_prompt_embeds_mask" in t:
            kwargs["negative_prompt_embeds_mask"] = t["negative_prompt_embeds_mask"][row:row + 1]
    elif request.negative_prompt is not None:
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


def refuse_non_finite(job: Job, finite: list[torch.Tensor]) -> None:
    """Latents that turned NaN or infinite decode to noise: fail before decoding, naming the first such step."""
    steps = torch.stack(finite).cpu()
    if not steps.all():
        first = int((~steps).nonzero()[0, 0]) + 1
        image = f" of image {job.image_index + 1} of {job.image_count}" if job.image_count > 1 else ""
        raise NumericalError(f"the latents turned NaN or infinite at step {first} of {len(finite)}{image}, so the "
                             "image would be noise; nothing was written. Lower true_cfg_scale or the LoRA scale "
                             "(attention_kwargs.scale), or check the tensors the request gave; a model run in float16 "
                             "overflows (use bfloat16)")


def same_images(returned: Any, images: list[Any]) -> list[Any]:
    """A postprocess hook's images: as many as it was given, each like the one it replaces (a PIL image of the same
    size and mode; for output_type latent, a tensor of the same shape, dtype and device)."""
    if not isinstance(returned, list) or len(returned) != len(images):
        raise TypeError(f"returned {describe(returned)}; expected None or a list of {len(images)} images")
    for index, (new, old) in enumerate(zip(returned, images, strict=True)):
        if describe(new) != describe(old):
            raise TypeError(f"returned {describe(new)} at index {index}; expected {describe(old)}, like the image "
                            "it replaces")
    return returned


def replaced_latents(returned: Any, latents: torch.Tensor) -> torch.Tensor:
    new = returned.get("latents", latents) if isinstance(returned, dict) and set(returned) <= {"latents"} else None
    if describe(new) != describe(latents):
        raise TypeError(f"returned {describe(returned)}; expected None or {{'latents': {describe(latents)}}}")
    return new


def describe(value: Any) -> str:
    """What a hook returned, as far as the job needs it to be: kind, shape and type."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}, {str(value.dtype).removeprefix('torch.')}, on {value.device}"
    if isinstance(value, Image.Image):
        return f"an image of {value.width}x{value.height} in mode {value.mode}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key!r}: {describe(item)}" for key, item in value.items()) + "}"
    return f"a list of {len(value)}" if isinstance(value, list) else f"an object of type {type(value).__name__}"


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
    width, height = output_size(job)
    result = InpaintResult(
        job_id=job.id,
        images=outputs,
        parameters=EffectiveParameters(
            width=width, height=height, processing_width=job.params["width"], processing_height=job.params["height"],
            num_inference_steps=job.params["num_inference_steps"], strength=job.params["strength"],
            steps_run=job.steps_run, true_cfg=job.true_cfg, true_cfg_scale=request.true_cfg_scale,
            guidance_scale=job.params["guidance_scale"] if model.guidance_distilled else None,
            padding_mask_crop=job.params["padding_mask_crop"], mask_grid=request.mask_grid, images=len(outputs),
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


