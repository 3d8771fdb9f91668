"""Mask preparation: grayscale at the image's size, binarised (white = repaint, transparent = keep), optionally
grown."""

from __future__ import annotations

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ..builtin.normalize import to_rgb
from ..hooks import hookimpl


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON types, as the request

    threshold: int = Field(128, ge=1, le=255, description="Gray level from which a pixel is repainted")
    grow: int = Field(0, ge=0, le=256, description="Pixels to dilate the mask by")


def prepare_mask(mask: Image.Image, size: tuple[int, int], options: Options) -> Image.Image:
    gray = to_gray(mask)
    if gray.size != size:  # documented: a mask of another size is stretched to the image's
        gray = gray.resize(size, Image.Resampling.BILINEAR)
    binary = gray.point(lambda v: 255 if v >= options.threshold else 0)
    if options.grow:  # O(log grow) passes over the image: PIL's MaxFilter costs grow squared per pixel
        binary = Image.fromarray(dilate(np.asarray(binary) > 0, options.grow).astype(np.uint8) * 255)
    return binary


def dilate(inside: np.ndarray, radius: int) -> np.ndarray:
    """Dilation by a (2 radius + 1) square, in O(log radius) shifted ORs per axis. Padded by the radius: a shift
    that pushed a border pixel's reach out of the array would leave a gap at the next, larger shift."""
    if radius <= 0:
        return inside
    out = np.pad(inside, radius)
    for axis in (0, 1):
        span = 0  # out covers [i - span, i + span] along this axis
        while span < radius:
            step = min(2 * span + 1, radius - span)
            grown = out.copy()
            if axis == 0:
                grown[step:] |= out[:-step]
                grown[:-step] |= out[step:]
            else:
                grown[:, step:] |= out[:, :-step]
                grown[:, :-step] |= out[:, step:]
            out, span = grown, span + step
    return out[radius:-radius, radius:-radius]


def to_gray(mask: Image.Image) -> Image.Image:
    """8-bit gray, transparent pixels black (kept): a canvas export is a white stroke on transparent black,
    as upstream's mask processor reads it (laid over white, it would repaint the whole image)."""
    return mask if mask.mode == "L" else to_rgb(mask, background=(0, 0, 0)).convert("L")


@hookimpl(tryfirst=True)
def inpaint_preprocess(job) -> None:
    job.mask = prepare_mask(job.mask, job.image.size, job.options("mask"))
