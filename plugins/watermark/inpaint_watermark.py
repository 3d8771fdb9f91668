"""Watermark overlay: a text and/or the operator's logo in a corner of every output image.

Only the pixels inside the watermark's bounding box can change: the box is cropped, the
watermark alpha-composited onto the crop, and the crop pasted back. Latent outputs
(tensors) pass through untouched. Defaults come from the environment (read each time
`Options` is built, i.e. at job start), so an operator can watermark every job:

    INPAINT_WATERMARK_TEXT, INPAINT_WATERMARK_IMAGE (a local logo file), INPAINT_WATERMARK_POSITION,
    INPAINT_WATERMARK_OPACITY, INPAINT_WATERMARK_MARGIN, INPAINT_WATERMARK_SIZE

A request can set `"plugins": {"watermark": {...}}` (see `Options`) or turn it off with `false`.
"""

from __future__ import annotations

import os
import threading
from typing import Literal

from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, ConfigDict, Field, model_validator

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
        default_factory=lambda: _env_number(ENV_OPACITY, 0.5, float, 0.0, 1.0), ge=0, le=1,
        description="0 (invisible) to 1 (opaque); default INPAINT_WATERMARK_OPACITY or 0.5",
    )
    margin: int = Field(
        default_factory=lambda: int(_env_number(ENV_MARGIN, 16, int, 0, None)), ge=0,
        description="Distance in pixels from the image's edges; default INPAINT_WATERMARK_MARGIN or 16",
    )
    size: float | None = Field(
        default_factory=_default_size, gt=0, le=1,
        description="Logo width as a fraction of the image width (default 0.2); text height as a fraction of the "
        "image height (default 0.05, at least 10 px); default INPAINT_WATERMARK_SIZE",
    )

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


def render_text(text: str, height_px: int) -> Image.Image:
    """White text with a thin dark outline (readable on any background), on a transparent tile."""
    font = load_font(height_px)
    stroke = max(1, height_px // 16)
    probe = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font, stroke_width=stroke)
    tile = Image.new("RGBA", (max(1, right - left), max(1, bottom - top)), (0, 0, 0, 0))
    ImageDraw.Draw(tile).text((-left, -top), text, font=font, fill=(255, 255, 255, 255), stroke_width=stroke,
                              stroke_fill=(0, 0, 0, 255))
    return tile


def render_mark(image_size: tuple[int, int], options: Options) -> Image.Image | None:
    """The watermark tile (RGBA, opacity applied), sized for an image of `image_size`; None if there is none."""
    width, height = image_size
    parts = []
    if options.image:
        logo = load_logo(_env(ENV_IMAGE) or "")
        logo_w = max(1, round((options.size or LOGO_SIZE) * width))
        logo_h = max(1, round(logo.height * logo_w / logo.width))
        parts.append(logo.resize((logo_w, logo_h), Image.Resampling.LANCZOS))
    if options.text is not None:
        text_h = max(MIN_TEXT_PX, round((options.size or TEXT_SIZE) * height))
        parts.append(render_text(options.text, text_h))
    if not parts:
        return None
    gap = max(2, height // 100) if len(parts) > 1 else 0
    tile = Image.new("RGBA", (max(p.width for p in parts), sum(p.height for p in parts) + gap), (0, 0, 0, 0))
    y = 0
    for part in parts:  # logo above text, centred
        tile.alpha_composite(part, ((tile.width - part.width) // 2, y))
        y += part.height + gap
    margin = effective_margin(image_size, options.margin)
    room_w, room_h = max(1, width - 2 * margin), max(1, height - 2 * margin)
    if tile.width > room_w or tile.height > room_h:  # never bigger than the image
        scale = min(room_w / tile.width, room_h / tile.height)
        tile = tile.resize((max(1, int(tile.width * scale)), max(1, int(tile.height * scale))),
                           Image.Resampling.LANCZOS)
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
def inpaint_postprocess(job, images: list) -> list | None:
    options = job_options(job)
    if not options.active or not any(isinstance(image, Image.Image) for image in images):
        return None
    return [apply_watermark(image, options) if isinstance(image, Image.Image) else image for image in images]
