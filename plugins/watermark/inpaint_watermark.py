"""Watermark overlay: a text and/or the operator's logo in a corner of every output image.

Only the pixels inside the watermark's bounding box can change: the box is cropped, the
watermark alpha-composited onto the crop, and the crop pasted back. Latent outputs
(tensors) pass through untouched. Defaults come from the environment (read each time
`Options` is built, i.e. at job start), so an operator can watermark every job:

    INPAINT_WATERMARK_TEXT, INPAINT_WATERMARK_IMAGE (a local logo file), INPAINT_WATERMARK_POSITION,
    INPAINT_WATERMARK_OPACITY, INPAINT_WATERMARK_MARGIN, INPAINT_WATERMARK_SIZE

A request can set `"plugins": {"watermark": {...}}` (see `Options`). The operator's watermark
(INPAINT_WATERMARK_TEXT and/or INPAINT_WATERMARK_IMAGE set) is on every job: a request may move
it (`position`, `margin`, `size`) or make it more opaque, and is refused (`invalid_request`) if it
tries to change its text, drop its logo, lower its opacity, turn the plugin off or ask for latent
outputs (which cannot carry it). Without an operator's watermark a request may do as it likes.

The watermark is measured before it is drawn and drawn at the size that fits the image, so
its memory is bounded by the image's size whatever the text and `size` ask for.
"""

from __future__ import annotations

import os
import threading
from typing import Literal

from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from worker.errors import InvalidRequest
from worker.hooks import hookimpl

NAME = "watermark"
Position = Literal["top-left", "top-right", "bottom-left", "bottom-right", "center"]
POSITIONS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right", "center")
LOGO_SIZE = 0.2  # default logo width, as a fraction of the image width
TEXT_SIZE = 0.05  # default text height, as a fraction of the image height
MIN_TEXT_PX = 10
ENV_TEXT = "INPAINT_WATERMARK_TEXT"
ENV_IMAGE = "INPAINT_WATERMARK_IMAGE"
ENV_POSITION = "INPAINT_WATERMARK_POSITION"
ENV_OPACITY = "INPAINT_WATERMARK_OPACITY"
ENV_MARGIN = "INPAINT_WATERMARK_MARGIN"
ENV_SIZE = "INPAINT_WATERMARK_SIZE"


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def _env_number(name: str, fallback: float, cast: type, low: float, high: float | None) -> float:
    raw = _env(name)
    if raw is None:
        return fallback
    try:
        value = cast(raw)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high) or value != value:
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}={raw!r} is not a valid {cast.__name__} {bounds}")
    return value


def _default_position() -> str:
    raw = _env(ENV_POSITION)
    if raw is None:
        return "bottom-right"
    if raw not in POSITIONS:
        raise ValueError(f"{ENV_POSITION}={raw!r} is not one of {list(POSITIONS)}")
    return raw


def operator_text() -> str | None:
    """INPAINT_WATERMARK_TEXT, the text every job carries; None when unset or blank."""
    return _env(ENV_TEXT)


def operator_logo() -> bool:
    """Whether INPAINT_WATERMARK_IMAGE names a logo that every job carries."""
    return _env(ENV_IMAGE) is not None


def operator_watermark() -> bool:
    """Whether the operator configured a watermark that every job must carry."""
    return operator_text() is not None or operator_logo()


def request_may_disable() -> bool:
    """Whether a request may turn this plugin off (`"plugins": {"watermark": false}`): only when the
    operator configured no watermark. Read by the worker's option check."""
    return not operator_watermark()


def _default_opacity() -> float:
    return _env_number(ENV_OPACITY, 0.5, float, 0.0, 1.0)


def _default_margin() -> int:
    return int(_env_number(ENV_MARGIN, 16, int, 0, None))


def _default_size() -> float | None:
    if _env(ENV_SIZE) is None:
        return None
    value = _env_number(ENV_SIZE, 0.0, float, 0.0, 1.0)
    if value <= 0:
        raise ValueError(f"{ENV_SIZE} must be > 0 and <= 1")
    return value


class Options(BaseModel):
    """A job's `plugins.watermark` object. Every default can be set by the operator's environment."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    text: str | None = Field(
        default_factory=lambda: _env(ENV_TEXT), max_length=200,
        description="Text to draw; default INPAINT_WATERMARK_TEXT (none)",
    )
    image: bool = Field(
        default_factory=lambda: _env(ENV_IMAGE) is not None,
        description="Draw the operator's logo (the file INPAINT_WATERMARK_IMAGE); default: true when that is set",
    )
    position: Position = Field(default_factory=_default_position, description="default INPAINT_WATERMARK_POSITION "
                               "or bottom-right")
    opacity: float = Field(
        default_factory=_default_opacity, ge=0, le=1,
        description="0 (invisible) to 1 (opaque); default INPAINT_WATERMARK_OPACITY or 0.5",
    )
    margin: int = Field(
        default_factory=_default_margin, ge=0,
        description="Distance in pixels from the image's edges; default INPAINT_WATERMARK_MARGIN or 16",
    )
    size: float | None = Field(
        default_factory=_default_size, gt=0, le=1,
        description="Logo width as a fraction of the image width (default 0.2); text height as a fraction of the "
        "image height (default 0.05, at least 10 px); default INPAINT_WATERMARK_SIZE",
    )

    @field_validator("text")
    @classmethod
    def _operator_text_stays(cls, value: str | None) -> str | None:
        required = operator_text()
        if required is not None and (value is None or value.strip() != required):
            raise ValueError(f"{ENV_TEXT} is set on this worker: every job carries the operator's watermark text, "
                             "and a request cannot change or remove it (it may move it, enlarge it or make it more "
                             "opaque)")
        return value

    @field_validator("image")
    @classmethod
    def _operator_logo_stays(cls, value: bool) -> bool:
        if operator_logo() and not value:
            raise ValueError(f"{ENV_IMAGE} is set on this worker: every job carries the operator's logo, and a "
                             "request cannot turn it off (it may move it, enlarge it or make it more opaque)")
        return value

    @field_validator("opacity")
    @classmethod
    def _operator_opacity_floor(cls, value: float) -> float:
        if operator_watermark():
            floor = _default_opacity()
            if value < floor:
                raise ValueError(f"{value} is below {floor:g}, the operator's opacity: this worker watermarks every "
                                 f"job ({ENV_TEXT} or {ENV_IMAGE} is set), and a request may make it more opaque, "
                                 "not less")
        return value

    @field_validator("size")
    @classmethod
    def _operator_size_floor(cls, value: float | None) -> float | None:
        if operator_watermark() and value is not None:
            floor = _default_size() or (LOGO_SIZE if operator_logo() else TEXT_SIZE)
            if value < floor:
                raise ValueError(f"{value:g} is below {floor:g}, the operator's size: this worker watermarks every "
                                 "job, and a request may make the mark larger, not smaller")
        return value

    @field_validator("margin")
    @classmethod
    def _operator_margin_ceiling(cls, value: int) -> int:
        if operator_watermark():
            ceiling = _default_margin()
            if value > ceiling:
                raise ValueError(f"{value} is over {ceiling}, the operator's margin: a wider margin leaves less room "
                                 "and shrinks the mark this worker puts on every job")
        return value

    @model_validator(mode="after")
    def _logo_available(self) -> Options:
        if self.image:
            path = _env(ENV_IMAGE)
            if path is None:
                raise ValueError(f"image: true needs the operator's logo file, and {ENV_IMAGE} is not set")
            if not os.path.isfile(path):
                raise ValueError(f"image: the logo file named by {ENV_IMAGE} does not exist on this worker")
        if self.text is not None and not self.text.strip():
            self.text = None
        return self

    @property
    def active(self) -> bool:
        return (self.text is not None or self.image) and self.opacity > 0


_logo_cache: dict[tuple[str, float], Image.Image] = {}
_logo_lock = threading.Lock()


def load_logo(path: str) -> Image.Image:
    """The operator's logo as RGBA, cached until the file changes."""
    key = (path, os.path.getmtime(path))
    with _logo_lock:
        logo = _logo_cache.get(key)
        if logo is None:
            with Image.open(path) as opened:
                logo = opened.convert("RGBA")
            _logo_cache.clear()
            _logo_cache[key] = logo
        return logo


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # Pillow < 10.1 or no FreeType: the small bitmap font
        return ImageFont.load_default()


def _stroke(font_px: int) -> int:
    return max(1, font_px // 16)


def measure_text(text: str, font_px: int) -> tuple[int, int]:
    """(width, height) the text takes at `font_px`, outline included: measured, nothing drawn."""
    font = load_font(font_px)
    probe = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font, stroke_width=_stroke(font_px))
    return max(1, right - left), max(1, bottom - top)


def fit_font(text: str, font_px: int, max_width: int, max_height: int) -> int:
    """The largest font size up to `font_px` at which the text fits `max_width` x `max_height`, found by
    measuring (text grows about linearly with the font size); 1 if none fits (the bitmap font has one size)."""
    for _ in range(8):
        width, height = measure_text(text, font_px)
        if (width <= max_width and height <= max_height) or font_px <= 1:
            return font_px
        font_px = max(1, min(font_px - 1, int(font_px * min(max_width / width, max_height / height))))
    while font_px > 1 and any(a > b for a, b in zip(measure_text(text, font_px), (max_width, max_height),
                                                    strict=True)):
        font_px -= 1
    return font_px


def render_text(text: str, height_px: int) -> Image.Image:
    """White text with a thin dark outline (readable on any background), on a transparent tile.

    The tile is as large as the text at `height_px`: callers pick the size with `fit_font` first.
    """
    font = load_font(height_px)
    stroke = _stroke(height_px)
    probe = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font, stroke_width=stroke)
    tile = Image.new("RGBA", (max(1, right - left), max(1, bottom - top)), (0, 0, 0, 0))
    ImageDraw.Draw(tile).text((-left, -top), text, font=font, fill=(255, 255, 255, 255), stroke_width=stroke,
                              stroke_fill=(0, 0, 0, 255))
    return tile


def render_mark(image_size: tuple[int, int], options: Options) -> Image.Image | None:
    """The watermark tile (RGBA, opacity applied), sized for an image of `image_size`; None if there is none.

    The layout is measured first (the logo's scaled size, the text's bounding box) and scaled to
    fit the image less its margins; only then is anything drawn, at that size. No intermediate
    image is larger than the image itself, whatever the text or `size` ask for.
    """
    width, height = image_size
    margin = effective_margin(image_size, options.margin)
    room_w, room_h = max(1, width - 2 * margin), max(1, height - 2 * margin)
    logo, logo_w, logo_h = None, 0.0, 0.0
    if options.image:
        logo = load_logo(_env(ENV_IMAGE) or "")
        logo_w = max(1.0, (options.size or LOGO_SIZE) * width)
        logo_h = max(1.0, logo.height * logo_w / logo.width)
    text_px, text_w, text_h = 0, 0, 0
    if options.text is not None:
        text_px = max(MIN_TEXT_PX, round((options.size or TEXT_SIZE) * height))
        text_w, text_h = measure_text(options.text, text_px)
    if logo is None and not text_px:
        return None
    gap = max(2, height // 100) if logo is not None and text_px else 0
    scale = min(1.0, room_w / max(logo_w, text_w), room_h / (logo_h + gap + text_h))  # never bigger than the room
    parts = []
    if logo is not None:
        size = (max(1, min(room_w, int(logo_w * scale))), max(1, min(room_h, int(logo_h * scale))))
        parts.append(logo.resize(size, Image.Resampling.LANCZOS))
    gap = int(gap * scale)
    if text_px:
        left_h = max(1, room_h - sum(part.height for part in parts) - gap)
        font_px = fit_font(options.text, max(1, int(text_px * scale)), room_w, left_h)
        parts.append(render_text(options.text, font_px))
    tile = Image.new("RGBA", (max(p.width for p in parts), sum(p.height for p in parts) + gap), (0, 0, 0, 0))
    y = 0
    for part in parts:  # logo above text, centred
        tile.alpha_composite(part, ((tile.width - part.width) // 2, y))
        y += part.height + gap
    if tile.width > room_w or tile.height > room_h:  # rounding, or the bitmap font's one size: shrink the rest
        fit = min(room_w / tile.width, room_h / tile.height)
        tile = tile.resize((max(1, int(tile.width * fit)), max(1, int(tile.height * fit))), Image.Resampling.LANCZOS)
    if options.opacity < 1:
        alpha = tile.getchannel("A").point(lambda a: round(a * options.opacity))
        tile.putalpha(alpha)
    return tile


def effective_margin(image_size: tuple[int, int], margin: int) -> int:
    """The margin, shrunk on an image too small for it (so that at least one pixel is left for the mark)."""
    return min(margin, max(0, (image_size[0] - 1) // 2), max(0, (image_size[1] - 1) // 2))


def watermark_box(image_size: tuple[int, int], mark_size: tuple[int, int], position: str,
                  margin: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a mark of `mark_size` placed at `position`, inside the image."""
    width, height = image_size
    mark_w, mark_h = min(mark_size[0], width), min(mark_size[1], height)
    vertical, _, horizontal = position.partition("-")
    if position == "center":
        left, top = (width - mark_w) // 2, (height - mark_h) // 2
    else:
        left = margin if horizontal == "left" else width - margin - mark_w
        top = margin if vertical == "top" else height - margin - mark_h
    left, top = min(max(0, left), width - mark_w), min(max(0, top), height - mark_h)
    return left, top, left + mark_w, top + mark_h


def apply_watermark(image: Image.Image, options: Options) -> Image.Image:
    """A copy of `image` with the watermark; only the pixels inside `watermark_box` can differ."""
    if not options.active:
        return image
    mark = render_mark(image.size, options)
    if mark is None:
        return image
    box = watermark_box(image.size, mark.size, options.position, effective_margin(image.size, options.margin))
    crop = image.crop(box).convert("RGBA")
    crop.alpha_composite(mark.crop((0, 0, box[2] - box[0], box[3] - box[1])))
    out = image.copy()
    out.paste(crop.convert(image.mode) if image.mode != "RGBA" else crop, box[:2])
    return out


def job_options(job) -> Options:
    options = job.options(NAME)
    if isinstance(options, Options):
        return options
    return Options.model_validate(options if isinstance(options, dict) else {})


@hookimpl
def inpaint_preprocess(job) -> None:
    """Before any GPU time: latent outputs cannot carry a watermark, so refuse them when the operator's is on."""
    if operator_watermark() and job.request.output_type == "latent" and job_options(job).active:
        raise InvalidRequest("output_type", f"latent outputs cannot carry a watermark, and this worker watermarks "
                             f"every job ({ENV_TEXT} or {ENV_IMAGE} is set); ask for png, jpeg or webp")


@hookimpl
def inpaint_postprocess(job, images: list) -> list | None:
    options = job_options(job)
    if not options.active or not any(isinstance(image, Image.Image) for image in images):
        return None
    return [apply_watermark(image, options) if isinstance(image, Image.Image) else image for image in images]
