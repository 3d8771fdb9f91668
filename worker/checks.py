"""The checks a job passes before any GPU time is spent (inputs as preprocessing left them: schedule, sizes,
prompt lengths, tensors), and the checks on what plugins return (images, latents) and on what the model makes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from .errors import InvalidRequest, NumericalError
from .model import count_prompt_tokens, template_closing_tokens
from .outputs import MAX_SIDE
from .schema import check_schedule

if TYPE_CHECKING:
    from .job import Job
    from .model import LoadedModel


def check_ready(job: Job, model: LoadedModel) -> int:
    """What can only be checked once inputs are loaded and preprocessed, before any GPU time is spent; returns the
    number of prompts (with prompt_embeds, the tensor's rows)."""
    request = job.request
    check_changed_schedule(job)
    check_sizes(job, model)
    if job.image.mode != "RGB":
        raise InvalidRequest("image", f"mode {job.image.mode} reached the pipeline; the normalize plugin converts "
                             "to RGB (is it blocked?)")
    if not job.mask.convert("L").getbbox():
        raise InvalidRequest("mask_image", "the mask is empty (all black): nothing to repaint; white marks the area "
                             "to repaint")
    check_prompt_lengths(job, model)
    prompts = check_tensors(job, model)
    images = prompts * request.num_images_per_prompt
    job.limits.check_images(images)
    if "latents" in job.tensors and job.tensors["latents"].shape[0] not in (1, images):
        raise InvalidRequest("latents", f"has {job.tensors['latents'].shape[0]} rows for {images} images; "
                             f"give 1 row (shared by every image) or {images} (one per image)")
    return prompts


SCHEDULE = ("num_inference_steps", "strength", "sigmas")


def check_changed_schedule(job: Job) -> None:
    """The denoising schedule, when a preprocess hook changed it in `params`, checked as the request's was."""
    schedule = {name: plain(job.params[name]) for name in SCHEDULE}  # a hook may give numpy values
    changed = [name for name in SCHEDULE if repr(schedule[name]) != repr(getattr(job.request, name))]  # 4.0 is not 4
    if not changed:
        return
    try:
        check_schedule(**schedule)
        job.limits.check_steps(schedule["num_inference_steps"])
    except InvalidRequest as error:
        raise InvalidRequest(error.field, f"{error.detail} (after a preprocess hook changed "
                             f"{', '.join(sorted(changed))} in job.params)") from None


def plain(value: Any) -> Any:
    """A numpy or torch value as the Python value it holds (lists for arrays); anything else as it is."""
    return value.tolist() if hasattr(value, "tolist") else value


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
    out_width, out_height = job.output_size
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
