"""The request a web backend sends, the result it gets back, and the progress in between: JSON only.

Field names are `QwenImageInpaintPipeline.__call__`'s own, with its defaults; `seed` stands
for `generator` and `output_type` is the file format. Images and tensors are references
(`data:` URLs, `s3://bucket/key`, allowed `https://` hosts, local paths in the local runner).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

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

from .errors import InvalidRequest

OutputType = Literal["png", "jpeg", "webp", "latent"]
MaskGrid = Literal["max_pool", "upstream"]
Stage = Literal["fetching", "preprocessing", "encoding", "denoising", "decoding", "postprocessing",
                "uploading"]
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
MAX_DEPTH = 20  # levels of nesting in a request: it needs 4 (plugin options hold a few more); pydantic and redaction
# recurse into what they are given, and a few hundred levels of [[[...]]] (1 KB of JSON) would exhaust Python's stack
MAX_PROMPT_CHARS = 20_000  # far past max_sequence_length's 1024 tokens: cheap to refuse before tokenizing counts them
MAX_PROMPTS = 1000  # as num_images_per_prompt: a worker's own cap, INPAINT_MAX_IMAGES, is lower
MAX_REFERENCE_CHARS = 4096  # an s3:// or https:// reference (S3 keys are at most 1024 bytes); data: URLs are capped
# by size, by the worker (INPAINT_DATA_URL_MAX_BYTES)
SURROGATE = re.compile(r"[\ud800-\udfff]")  # half a UTF-16 pair: no UTF-8 encodes it
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
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
            raise ValueError(f"must be at most {most} ({why}), got {_shown_input(value)}")
        return value

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, value: int | list[int] | None) -> int | list[int] | None:
        for seed in [value] if isinstance(value, int) else value or []:
            if not 0 <= seed < 2**63:
                raise ValueError(f"each seed must be in [0, 2**63), got {_shown_input(seed)}")
        return value

    @field_validator("sigmas")
    @classmethod
    def _sigmas_decreasing(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("must not be empty")
        if any(not 0 < s <= 1 for s in value):
            raise ValueError("each sigma must be in (0, 1]")
        if any(a <= b for a, b in zip(value, value[1:], strict=False)):
            raise ValueError("must be strictly decreasing")
        return value

    @field_validator("attention_kwargs")
    @classmethod
    def _attention_keys(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        unknown = set(value or {}) - ATTENTION_KWARGS_ALLOWED
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}; allowed: {sorted(ATTENTION_KWARGS_ALLOWED)}")
        scale = (value or {}).get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not _finite(scale) or abs(scale) > 100:
            raise _field_error("attention_kwargs.scale", "the LoRA scale must be a finite number from -100 to 100 "
                               f"(1 is the LoRA as trained), got {_shown_input(scale)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> InpaintRequest:
        if (self.prompt is None) == (self.prompt_embeds is None):
            raise _field_error("prompt", "give exactly one of prompt or prompt_embeds")
        if self.negative_prompt is not None and self.negative_prompt_embeds is not None:
            raise _field_error("negative_prompt", "give at most one of negative_prompt or negative_prompt_embeds")
        if isinstance(self.prompt, list) and not self.prompt:
            raise _field_error("prompt", "the list of prompts is empty")
        for mask, embeds in (("prompt_embeds_mask", "prompt_embeds"),
                             ("negative_prompt_embeds_mask", "negative_prompt_embeds")):
            if getattr(self, mask) is not None and getattr(self, embeds) is None:
                raise _field_error(mask, f"needs {embeds}")
        prompts = self.prompt_count  # with prompt_embeds, known once the tensor is loaded (job.check_tensors)
        if isinstance(self.negative_prompt, list) and self.prompt is not None and len(self.negative_prompt) != prompts:
            raise _field_error(
                "negative_prompt", f"has {len(self.negative_prompt)} entries for {prompts} prompts; give one each"
            )
        if isinstance(self.seed, list) and self.prompt is not None and len(self.seed) != self.image_count:
            raise _field_error(
                "seed", f"has {len(self.seed)} seeds for {self.image_count} images "
                "(prompts x num_images_per_prompt); give one int or one seed per image"
            )
        if self.sigmas is not None and len(self.sigmas) != self.num_inference_steps:
            raise _field_error(
                "sigmas", f"has {len(self.sigmas)} values but num_inference_steps is {self.num_inference_steps}; "
                "give one sigma per step"
            )
        if self.steps_run < 1:
            raise _field_error(
                "strength", f"{self.strength} x {self.num_inference_steps} steps leaves no step to run; "
                f"raise strength to at least {1 / self.num_inference_steps:.4g} or add steps"
            )
        if self.padding_mask_crop is not None and self.output_type == "latent":
            raise _field_error("padding_mask_crop", "cannot be used with output_type 'latent' (it pastes images)")
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


def steps_run(num_inference_steps: int, strength: float) -> int:
    """Denoising steps that really run, computed exactly as the pipeline trims the schedule."""
    n = num_inference_steps
    return n - int(max(n - min(n * strength, n), 0))


SECRET_KEY = re.compile(r"secret|token|passw|api_?key|authori[sz]ation|credential|signature", re.I)


def redacted(value: Any, depth: int = 0) -> Any:
    """A request (or any part of one) as it may be recorded: in result.json, logs, task events.

    `data:` URLs are shortened to their type and size (they can be megabytes), URLs lose their
    query, fragment and user info (signatures, tokens, passwords), and values under keys named
    like secrets are hidden, at any depth; what lies deeper than MAX_DEPTH is not shown.
    """
    if isinstance(value, dict | list | tuple) and depth >= MAX_DEPTH:
        return "<nested too deep>"
    if isinstance(value, dict):
        return {key: "<redacted>" if SECRET_KEY.search(str(key)) and value[key] is not None
                else redacted(value[key], depth + 1) for key in value}
    if isinstance(value, list | tuple):
        return [redacted(item, depth + 1) for item in value]
    if isinstance(value, str):
        return redacted_text(value)  # a reference, or a prompt that quotes one
    return value


def redacted_reference(ref: str) -> str:
    """One reference as it may be shown: `data:` URLs by size, other URLs without query or credentials (even
    a malformed one)."""
    if ref.startswith("data:"):
        return f"{ref.split(',', 1)[0][:100]},... ({len(ref)} characters)"
    if "://" not in ref:  # a prompt like "photo: a cat" is no URL
        return ref
    try:
        parts = urlsplit(ref)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        scheme, _, rest = ref.split("?", 1)[0].split("#", 1)[0].partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"
    if not parts.scheme or not ref[len(parts.scheme):].startswith("://"):  # "style: https://..." is a prompt
        return ref
    query = "?..." if parts.query or parts.fragment else ""  # e.g. redis+socket:///run/r.sock?password=...
    scheme = ref[:len(parts.scheme)]  # as written: urlsplit lower-cases it
    return f"{scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}{query}"  # no user:password@


URL_IN_TEXT = re.compile(r"\b(?:data:[\w.+/-]*[;,]|[A-Za-z][A-Za-z0-9+.-]*://)[^\s'\"<>]*")


def redacted_text(text: str) -> str:
    """Free text (an error message from a plugin or a library) with each URL in it shown as `redacted_reference`
    shows one."""
    def shown(url: re.Match) -> str:
        return url.group() if url.group().endswith(",...") else redacted_reference(url.group())  # shown already

    return URL_IN_TEXT.sub(shown, text)


def _field_error(field: str, message: str) -> ValueError:
    return ValueError(f"[{field}] {message}")


def _finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int too large for a float
        return False


def _shown_input(value: Any) -> str:
    """An input as an error quotes it: cut to 80 characters, a huge integer by its size (Python prints 4300 digits at
    most)."""
    if isinstance(value, int) and abs(value) >= 10**80:
        return f"an integer of about {round(abs(value).bit_length() * math.log10(2))} digits"
    return f"{value!r:.80}"


@dataclass(frozen=True)
class Limits:
    """What a worker allows; checked against a request once the model is known."""

    max_pixels: int
    max_steps: int
    max_images: int
    max_deadline_s: float
    size_factor: int

    def check(self, request: InpaintRequest) -> None:
        self.check_steps(request.num_inference_steps)
        self.check_images(request.image_count)
        if request.deadline_s is not None and request.deadline_s > self.max_deadline_s:
            raise InvalidRequest("deadline_s", f"{request.deadline_s} is over this worker's cap of "
                                 f"{self.max_deadline_s} s")
        for name in ("height", "width"):
            value = getattr(request, name)
            if value is not None:
                self.check_side(value, name)
            if value is not None and value % self.size_factor:
                raise InvalidRequest(
                    name, f"{value} is not a multiple of {self.size_factor} (the model's size factor); "
                    f"try {max(self.size_factor, round(value / self.size_factor) * self.size_factor)}"
                )

    def check_steps(self, num_inference_steps: int) -> None:
        if num_inference_steps > self.max_steps:
            raise InvalidRequest(
                "num_inference_steps", f"{num_inference_steps} is over this worker's cap of {self.max_steps}"
            )

    def check_images(self, count: int) -> None:
        if count > self.max_images:
            raise InvalidRequest(
                "num_images_per_prompt",
                f"the job would make {count} images (prompts x num_images_per_prompt); this worker allows at most "
                f"{self.max_images}",
            )

    def check_side(self, value: int, field: str) -> None:
        if value > self.max_side:
            raise InvalidRequest(field, f"{value} px is over the longest side this model can work at, {self.max_side} "
                                 f"px (its position table covers 4096 patches of {self.size_factor} px)")

    def check_size(self, width: int, height: int, field: str = "height") -> None:
        if width * height > self.max_pixels:
            raise InvalidRequest(
                field, f"{width}x{height} is {width * height} pixels, over this worker's budget of "
                f"{self.max_pixels}"
            )

    def default_size(self, width: int, height: int) -> tuple[int, int]:
        """The input's own size, scaled down to the pixel budget and rounded down to the size factor. A side too
        short to scale (a 1x4000000 strip) is raised to one factor, and the other is shortened to keep the budget."""
        scale = min(1.0, math.sqrt(self.max_pixels / (width * height)))
        f, most = self.size_factor, self.max_side
        fitted_w, fitted_h = max(f, int(width * scale) // f * f), max(f, int(height * scale) // f * f)
        if fitted_w * fitted_h > self.max_pixels or max(fitted_w, fitted_h) > most:
            if fitted_w == f:
                fitted_h = max(f, min(self.max_pixels // f // f * f, most))
            else:
                fitted_w = max(f, min(self.max_pixels // f // f * f, most))
        return fitted_w, fitted_h

    @property
    def max_side(self) -> int:
        """The longest side the model can work at: Qwen-Image's position table has 4096 entries, shared by half the
        image's longest side (in patches of `size_factor` pixels) and the prompt's tokens (1024 at most)."""
        return 4096 * self.size_factor


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
        raise InvalidRequest(*_describe(error)) from None


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


UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-\w+\[.*\])$")


def _describe(error: ValidationError) -> tuple[str, str]:
    """One field and one message a person can act on, from pydantic's list of errors."""
    problems: dict[str, list[str]] = {}
    for item in error.errors():
        # a union field (str | list[str]) reports one error per member, tagged in the location
        field = ".".join(str(part) for part in item["loc"] if not UNION_TAG.match(str(part))) or "request"
        message = item["msg"].removeprefix("Value error, ")
        named = re.match(r"^\[([\w.]+)\] (.*)$", message, re.S)
        if named:
            field, message = named.groups()
        if item["type"] == "extra_forbidden":
            message = "unknown field; see InpaintRequest for the fields a job takes"
        problems.setdefault(field, [])
        if message not in problems[field]:
            problems[field].append(message)
        if item["type"].startswith(("int_", "float_", "string_", "bool_", "list_", "dict_", "literal_")):
            problems[field].append(f"(got {_shown_input(redacted(item.get('input')))})")
    parts = [f"{field}: " * bool(i) + " or ".join(m for m in msgs if not m.startswith("(got"))
             + "".join(f" {m}" for m in dict.fromkeys(msgs) if m.startswith("(got"))
             for i, (field, msgs) in enumerate(problems.items())]
    return next(iter(problems)), "; ".join(parts)


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
