"""The request a web backend sends, the result it gets back, and the progress in between: JSON only.

Field names are `QwenImageInpaintPipeline.__call__`'s own, with its defaults; `seed` stands
for `generator` and `output_type` is the file format. Images and tensors are references
(`data:` URLs, `s3://bucket/key`, allowed `https://` hosts, local paths in the local runner).
"""

from __future__ import annotations

import importlib
import math
import re
import warnings
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from .errors import InvalidRequest, describe_invalid, shown_input
from .redaction import MAX_DEPTH

OutputType = Literal["png", "jpeg", "webp", "latent"]
MaskGrid = Literal["max_pool", "upstream"]
Mode = Literal["standard", "fast"]
Stage = Literal["requeued", "fetching", "preprocessing", "encoding", "denoising", "decoding", "postprocessing",
                "uploading"]  # requeued: its worker died, and it waits at the front of its queue for another
ATTENTION_KWARGS_ALLOWED = {"scale"}
# Generous bounds, far past any useful value: a bigger number is a mistake, and arithmetic on it could overflow a float.
UPPER_BOUNDS = {
    "num_inference_steps": (1000, "generous: Qwen-Image needs 20 to 50, and a worker's own cap, INPAINT_MAX_STEPS, "
                                  "is lower"),
    "preview_every": (1000, "the most steps a job can have"),
    "num_images_per_prompt": (1000, "generous: a worker's own cap, INPAINT_MAX_IMAGES, is lower"),
    "height": (65536, "generous: the worker's pixel budget, INPAINT_MAX_PIXELS, is the real limit"),
    "width": (65536, "generous: the worker's pixel budget, INPAINT_MAX_PIXELS, is the real limit"),
    "padding_mask_crop": (65536, "a wider margin crops no less: the crop stops at the image's edges"),
    "true_cfg_scale": (100, "generous: Qwen-Image uses about 4, the picture burns long before 100, and far past it "
                            "the arithmetic overflows into NaN noise"),
    "guidance_scale": (100, "generous: a guidance-distilled model uses about 1 to 4"),
}
MAX_PROMPT_CHARS = 20_000  # far past max_sequence_length's 1024 tokens: cheap to refuse before tokenizing counts them
MAX_PROMPTS = 1000  # as num_images_per_prompt: a worker's own cap, INPAINT_MAX_IMAGES, is lower
MAX_REFERENCE_CHARS = 4096  # an s3:// or https:// reference (S3 keys are at most 1024 bytes); data: URLs are capped
# by size, by the worker (INPAINT_DATA_URL_MAX_BYTES)
SURROGATE = re.compile(r"[\ud800-\udfff]")  # half a UTF-16 pair: no UTF-8 encodes it
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
MAX_ADAPTERS = 16  # generous: a worker's own cap, INPAINT_LORA_MAX_PER_JOB, is lower
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # torch.load runs code from these
# what a job fetches (s3://, https://, data:): the pictures and the tensors
REFERENCE_FIELDS = ("image", "mask_image", "masked_image_latents", "latents", "prompt_embeds", "prompt_embeds_mask",
                    "negative_prompt_embeds", "negative_prompt_embeds_mask")


class OutputOptions(BaseModel):
    """Where and how results are written (the bucket and prefix apply to the queue's S3 sink)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    bucket: str | None = None
    prefix: str | None = Field(None, pattern=r"^[A-Za-z0-9_./-]{0,200}$", description="default: INPAINT_OUTPUT_PREFIX")
    quality: int = Field(95, ge=1, le=100, description="JPEG and WebP quality")

    @field_validator("prefix")
    @classmethod
    def _plain_key_prefix(cls, value: str | None) -> str | None:
        parts = (value or "").strip("/").split("/")
        if value and ("" in parts or any(part in (".", "..") for part in parts)):
            raise ValueError(f"{value!r:.80} has an empty, '.' or '..' path segment; use names joined by single "
                             "slashes, e.g. 'renders/2026'")
        return value


class AdapterRef(BaseModel):
    """One LoRA a job applies: a name in the operator's adapter library (never a path or URL), its scale, and the
    scheduler shift it was trained for, where it needs one (Qwen-Image-Lightning: 3)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    ref: str = Field(..., description="A name in the worker's adapter library (INPAINT_LORA_DIR, INPAINT_LORA_BUCKETS)")
    scale: float = Field(1.0, ge=-100, le=100, description="1 is the LoRA as trained, 0 the model without it")
    shift: float | None = Field(None, gt=0, le=100, description="The flow-matching shift the LoRA expects (a "
                                "distilled LoRA's); unset: the model's own schedule")

    @field_validator("ref")
    @classmethod
    def _library_name(cls, value: str) -> str:
        if value.lower().endswith(PICKLE_SUFFIXES):
            raise ValueError(f"{value[:80]!r} names a pickle file, which can run code when read: safetensors only")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", value) or ".." in value:
            raise ValueError(f"{value[:80]!r} is not a name in the adapter library: letters, digits, '_', '-' and "
                             "'.', at most 128 characters, no '/', '..' or URL (the operator's library holds the "
                             "files; a request only names one)")
        return value.removesuffix(".safetensors")


class InpaintRequest(BaseModel):
    """One inpainting job. Unknown fields are rejected; JSON types are not coerced (`"7"` is not an int,
    `true` not a number) and numbers must be finite."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str | list[str] | None = None
    negative_prompt: str | list[str] | None = None
    true_cfg_scale: float = Field(4.0, ge=0)
    image: str = Field(..., description="Reference to the image (one a job: a job's prompts share it)")
    mask_image: str = Field(..., description="Reference to the mask (white = repaint)")
    masked_image_latents: str | None = None
    height: int | None = Field(None, gt=0)
    width: int | None = Field(None, gt=0)
    padding_mask_crop: int | None = Field(None, gt=0)
    strength: float = Field(0.6, gt=0, le=1)
    num_inference_steps: int = Field(50, ge=1)
    sigmas: list[float] | None = None
    guidance_scale: float | None = Field(
        None, ge=0, description="Read only by a guidance-distilled model (default 1.0 there); Qwen-Image ignores it"
    )
    num_images_per_prompt: int = Field(1, ge=1)
    seed: int | list[int] | None = None
    latents: str | None = None
    prompt_embeds: str | None = None
    prompt_embeds_mask: str | None = None
    negative_prompt_embeds: str | None = None
    negative_prompt_embeds_mask: str | None = None
    output_type: OutputType = "png"
    attention_kwargs: dict[str, Any] | None = None
    max_sequence_length: int = Field(512, ge=1, le=1024)
    mask_grid: MaskGrid = Field(
        "max_pool", description="How the mask reaches the model's latent grid (8x8-pixel cells; 4x4 for the tiny "
        "model): \"max_pool\" repaints every cell the mask touches; \"upstream\" samples one pixel a cell as "
        "QwenImageInpaintPipeline does (a stroke between the samples is left as it was), for results identical to a "
        "direct call"
    )

    job_id: str | None = Field(None, pattern=JOB_ID_PATTERN)
    output: OutputOptions = Field(default_factory=OutputOptions)
    plugins: dict[str, bool | dict[str, Any]] = Field(
        default_factory=dict, description="Options by plugin name; false turns that plugin off for this job"
    )
    deadline_s: float | None = Field(None, gt=0)
    priority: int = Field(
        0, ge=0, le=9, description="Who goes first: 0 is the most urgent (the default), 9 the least, the Redis way; "
        "0-2, 3-5, 6-8 and 9 each share a list, first come first served within it"
    )
    adapters: list[AdapterRef] = Field(
        default_factory=list, max_length=MAX_ADAPTERS, description="LoRAs from the worker's adapter library, "
        "applied in this job only"
    )
    mode: Mode = Field("standard", description="\"fast\": the worker's few-step configuration (its distilled "
                       "adapter, steps and scheduler shift; true CFG off): lossy, many times faster")
    preview_every: int | None = Field(None, ge=1, description="A small preview every N denoising steps")

    @field_validator("padding_mask_crop", mode="before")
    @classmethod
    def _no_zero_crop(cls, value: object) -> object:
        if value == 0 and not isinstance(value, bool):
            raise ValueError(
                "0 would still crop to the mask's bounding box with no margin; "
                "use null for no cropping or a margin in pixels (> 0)"
            )
        return value

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _prompt_size(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_PROMPTS:
            raise ValueError(f"has {len(value)} prompts; at most {MAX_PROMPTS}")
        for index, text in enumerate([value] if isinstance(value, str) else value or []):
            if len(text) > MAX_PROMPT_CHARS:
                which = f"entry {index} is" if isinstance(value, list) else "is"
                raise ValueError(f"{which} {len(text)} characters, over the cap of {MAX_PROMPT_CHARS} (a prompt "
                                 "must fit max_sequence_length, at most 1024 tokens)")
        return value

    @field_validator(*REFERENCE_FIELDS)
    @classmethod
    def _reference_size(cls, value: str | None) -> str | None:
        if value is not None and len(value) > MAX_REFERENCE_CHARS and value[:5].lower() != "data:":
            raise ValueError(f"is {len(value)} characters; an s3:// or https:// reference is at most "
                             f"{MAX_REFERENCE_CHARS}")
        return value

    @field_validator(*UPPER_BOUNDS)
    @classmethod
    def _at_most(cls, value: int | None, info: ValidationInfo) -> int | None:
        most, why = UPPER_BOUNDS[info.field_name]
        if value is not None and value > most:
            raise ValueError(f"must be at most {most} ({why}), got {shown_input(value)}")
        return value

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, value: int | list[int] | None) -> int | list[int] | None:
        for seed in [value] if isinstance(value, int) else value or []:
            if not 0 <= seed < 2**63:
                raise ValueError(f"each seed must be in [0, 2**63), got {shown_input(seed)}")
        return value

    @field_validator("attention_kwargs")
    @classmethod
    def _attention_keys(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        unknown = set(value or {}) - ATTENTION_KWARGS_ALLOWED
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}; allowed: {sorted(ATTENTION_KWARGS_ALLOWED)}")
        scale = (value or {}).get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not _finite(scale) or abs(scale) > 100:
            raise InvalidRequest("attention_kwargs.scale", "the LoRA scale must be a finite number from -100 to 100 "
                               f"(1 is the LoRA as trained), got {shown_input(scale)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> InpaintRequest:
        if (self.prompt is None) == (self.prompt_embeds is None):
            raise InvalidRequest("prompt", "give exactly one of prompt or prompt_embeds")
        if self.negative_prompt is not None and self.negative_prompt_embeds is not None:
            raise InvalidRequest("negative_prompt", "give at most one of negative_prompt or negative_prompt_embeds")
        if isinstance(self.prompt, list) and not self.prompt:
            raise InvalidRequest("prompt", "the list of prompts is empty")
        for mask, embeds in (("prompt_embeds_mask", "prompt_embeds"),
                             ("negative_prompt_embeds_mask", "negative_prompt_embeds")):
            if getattr(self, mask) is not None and getattr(self, embeds) is None:
                raise InvalidRequest(mask, f"needs {embeds}")
        prompts = self.prompt_count  # with prompt_embeds, known once the tensor is loaded (job.check_tensors)
        if isinstance(self.negative_prompt, list) and self.prompt is not None and len(self.negative_prompt) != prompts:
            raise InvalidRequest(
                "negative_prompt", f"has {len(self.negative_prompt)} entries for {prompts} prompts; give one each"
            )
        if isinstance(self.seed, list) and self.prompt is not None and len(self.seed) != self.image_count:
            raise InvalidRequest(
                "seed", f"has {len(self.seed)} seeds for {self.image_count} images "
                "(prompts x num_images_per_prompt); give one int or one seed per image"
            )
        check_schedule(self.num_inference_steps, self.strength, self.sigmas)
        if self.padding_mask_crop is not None and self.output_type == "latent":
            raise InvalidRequest("padding_mask_crop", "cannot be used with output_type 'latent' (it pastes images)")
        return self

    @property
    def prompt_count(self) -> int:
        if isinstance(self.prompt, list):
            return len(self.prompt)
        return 1 if self.prompt is not None else 0

    @property
    def image_count(self) -> int:
        """Images the job makes; with prompt_embeds the count is known once the tensor is loaded."""
        return max(self.prompt_count, 1) * self.num_images_per_prompt

    @property
    def steps_run(self) -> int:
        return steps_run(self.num_inference_steps, self.strength)

    def plugin_enabled(self, name: str) -> bool:
        return self.plugins.get(name, True) is not False


def check_schedule(num_inference_steps: Any, strength: Any, sigmas: Any) -> None:
    """The denoising schedule's rules: a request's (whose fields' types and ranges pydantic checked first), and the
    same for a schedule a preprocess hook changed in `job.params`."""
    steps = num_inference_steps
    most = UPPER_BOUNDS["num_inference_steps"][0]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= most:
        raise InvalidRequest("num_inference_steps", f"must be an integer from 1 to {most}, got {shown_input(steps)}")
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 < strength <= 1:
        raise InvalidRequest("strength", f"must be a number in (0, 1], got {shown_input(strength)}")
    if sigmas is not None:
        if not isinstance(sigmas, list) or not sigmas or any(isinstance(s, bool) or not isinstance(s, int | float)
                                                              for s in sigmas):
            raise InvalidRequest("sigmas", f"must be a non-empty list of numbers, got {shown_input(sigmas)}")
        if any(not 0 < s <= 1 for s in sigmas):
            raise InvalidRequest("sigmas", "each sigma must be in (0, 1]")
        if any(a <= b for a, b in zip(sigmas, sigmas[1:], strict=False)):
            raise InvalidRequest("sigmas", "must be strictly decreasing")
        if len(sigmas) != steps:
            raise InvalidRequest("sigmas", f"has {len(sigmas)} values but num_inference_steps is {steps}; give one "
                                 "sigma per step")
    if steps_run(steps, strength) < 1:
        raise InvalidRequest("strength", f"{strength} x {steps} steps leaves no step to run; raise strength to at "
                             f"least {1 / steps:.4g} or add steps")


def steps_run(num_inference_steps: int, strength: float) -> int:
    """Denoising steps that really run, computed exactly as the pipeline trims the schedule."""
    n = num_inference_steps
    return n - int(max(n - min(n * strength, n), 0))


def _finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int too large for a float
        return False


def parse_request(data: dict | InpaintRequest) -> InpaintRequest:
    """Validate a request; any problem becomes an `InvalidRequest` naming the field and what is allowed."""
    if isinstance(data, InpaintRequest):
        return data
    if not isinstance(data, dict):
        raise InvalidRequest("request", f"must be a JSON object, got {type(data).__name__}")
    check_plain_json(data)
    try:
        return InpaintRequest.model_validate(data)
    except ValidationError as error:
        raise InvalidRequest(*describe_invalid(error)) from None


def check_plain_json(data: dict) -> None:
    """Refuse, before anything recurses into it, a request nested over MAX_DEPTH levels, and text that holds half a
    UTF-16 surrogate pair (what JavaScript sends after cutting a string inside an emoji): no UTF-8 encodes it, so the
    tokenizer and result.json would fail on it. Walked with a list, not recursion."""
    pending: list[tuple[tuple, Any]] = [((), data)]
    while pending:
        path, value = pending.pop()
        if len(path) > MAX_DEPTH:
            raise InvalidRequest(str(path[0]), f"is nested over {MAX_DEPTH} levels deep; a request's values are "
                                 "a few levels at most")
        if isinstance(value, str):
            refuse_half_characters(value, path, "")
        elif isinstance(value, dict):
            for key, item in value.items():
                refuse_half_characters(str(key), path, "a key: ")
                pending.append(((*path, key), item))
        elif isinstance(value, list | tuple):
            pending.extend(((*path, index), item) for index, item in enumerate(value))


def refuse_half_characters(text: str, path: tuple, what: str) -> None:
    half = SURROGATE.search(text)
    if half:
        raise InvalidRequest(".".join(map(str, path)) or "request", f"{what}character {half.start() + 1} is half of a "
                             f"UTF-16 surrogate pair ({half.group().encode('unicode_escape').decode()}), as "
                             "JavaScript leaves when it cuts a string inside an emoji; send whole characters")


class QueuePlace(BaseModel):
    """Where a waiting job stands: `position` 1 is the next job a worker of `queue` takes (more urgent jobs sent
    later go before it); `waiting` jobs wait in the queue in all; `starts_in_s` is the time until it starts at the
    pace the queue's jobs ended lately (None until two have)."""

    queue: str
    position: int
    waiting: int
    starts_in_s: float | None = None


class Progress(BaseModel):
    """The small meta a running job reports (state PROGRESS in the queue)."""

    stage: Stage
    step: int = 0
    total_steps: int = 0
    image: int = 0
    images: int = 1
    percent: float = 0.0
    elapsed_s: float = 0.0
    eta_s: float | None = None
    preview: str | None = None


class ImageOutput(BaseModel):
    index: int
    location: str
    url: str | None = None
    content_type: str
    width: int | None = None
    height: int | None = None
    seed: int
    prompt_index: int


class AdapterUsed(BaseModel):
    """An adapter a job applied: its library name, the sha256 of its file, the scale and the shift it ran with."""

    name: str
    sha256: str
    scale: float
    shift: float | None = None


class EffectiveParameters(BaseModel):
    """What really ran, which is not always what was asked (true CFG silently off, trimmed steps).

    `width` and `height` are the output images' size; `processing_width` and `processing_height` the
    size the model worked at. They differ only with `padding_mask_crop`: the model works on the crop,
    which is pasted back into the input, so the output has the input's size. `guidance_scale` is what
    a guidance-distilled model was given; None for a model that takes none (Qwen-Image ignores it).
    The fields with defaults are missing from results of older workers.
    """

    width: int
    height: int
    processing_width: int | None = None
    processing_height: int | None = None
    num_inference_steps: int
    strength: float
    steps_run: int
    true_cfg: bool
    true_cfg_scale: float
    guidance_scale: float | None = None
    padding_mask_crop: int | None
    mask_grid: MaskGrid = "max_pool"
    mode: Mode = "standard"
    adapters: list[AdapterUsed] = Field(default_factory=list)
    images: int
    seeds: list[int]
    output_type: OutputType
    plugins: list[str]


class WorkerInfo(BaseModel):
    """Who ran a job: `node` (the Celery worker, e.g. `gpu0@host`), `device` (`cuda (CUDA_VISIBLE_DEVICES=1)`,
    `cpu`), `versions` (`worker`, `diffusers`, `torch`) and `queue_wait_s` (submit to start, for jobs sent by
    `InpaintClient` or with the `inpaint_submitted_at` header). Fields of other worker versions are kept as
    extras; a field the worker did not write is None, and left out of the JSON. Reads as the dict it once was
    too: `worker["node"]`, `worker.get("queue_wait_s", 0.0)`."""

    model_config = ConfigDict(extra="allow")

    node: str | None = None
    device: str | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    queue_wait_s: float | None = None

    @model_serializer(mode="wrap")
    def _as_written(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set or k in (self.model_extra or {})}

    def __getitem__(self, name: str) -> Any:
        if name in self.model_fields_set or name in (self.model_extra or {}):
            return getattr(self, name)
        raise KeyError(name)

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self.model_fields_set or name in (self.model_extra or {}) else default


class InpaintResult(BaseModel):
    job_id: str
    images: list[ImageOutput]
    parameters: EffectiveParameters
    timings: dict[str, float]
    model: dict[str, Any]
    worker: WorkerInfo = Field(default_factory=WorkerInfo)


MOVED = {"redacted": "worker.redaction", "redacted_reference": "worker.redaction", "redacted_text": "worker.redaction",
         "Limits": "worker.limits"}


def __getattr__(name: str) -> Any:
    """Names that moved to rooms of their own, still found here for plugins written against them (deprecated)."""
    if name not in MOVED:
        raise AttributeError(f"module 'worker.schema' has no attribute {name!r}")
    warnings.warn(f"worker.schema.{name} is deprecated: import it from {MOVED[name]}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(MOVED[name]), name)
