"""Paste-back overlay: pixels outside the mask come back as they went in; a soft edge inside.

Outside the mask the output is the input exactly (resized first if the output's size differs).

Without it, every pixel goes through the VAE and drifts a little, even where nothing
was to change. On by default; `{"paste_back": false}` turns it off for a job.

The soft edge never removes the mask's inside: its width is the smaller of `feather` and the
mask's local thickness, so a thin stroke or a small spot still gets generated pixels (fully at
its centre) instead of vanishing under a ramp wider than itself.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ..hooks import hookimpl
from .mask import dilate


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON types, as the request

    feather: int = Field(4, ge=0, le=128, description="Width in pixels of the soft edge, inside the mask (narrower "
                                                      "where the mask is thinner)")


def _erode(inside: np.ndarray) -> np.ndarray:
    """One 3x3 square erosion; beyond the image's border the mask is taken to go on (no edge there)."""
    rows = inside.copy()
    rows[1:] &= inside[:-1]
    rows[:-1] &= inside[1:]
    out = rows.copy()
    out[:, 1:] &= rows[:, :-1]
    out[:, :-1] &= rows[:, 1:]
    return out


def blend_weights(inside: np.ndarray, feather: int) -> np.ndarray:
    """The generated image's weight in [0, 1]: 0 outside the mask, ramping up to 1 inside it.

    A pixel `depth` erosions inside the mask gets (depth + 1) / width, where width is
    `feather`, cut down to the mask's local thickness (1 + the half-size of the largest
    square inside the mask that covers the pixel). So a mask wider than 2 x feather ramps
    over `feather` pixels, and a thinner one still reaches 1 at its centre; a 1 px line is
    pasted at full weight. Cost: a few array operations per feather step, on the mask's box.
    """
    weights = np.zeros(inside.shape, dtype=np.float32)
    if not inside.any():
        return weights
    if feather <= 1:
        weights[inside] = 1.0
        return weights
    rows, cols = np.nonzero(inside.any(axis=1))[0], np.nonzero(inside.any(axis=0))[0]
    top, bottom = max(0, rows[0] - 1), min(inside.shape[0], rows[-1] + 2)  # one ring of outside pixels, if any
    left, right = max(0, cols[0] - 1), min(inside.shape[1], cols[-1] + 2)
    box = inside[top:bottom, left:right]
    depth = np.zeros(box.shape, dtype=np.int16)  # erosions survived, up to feather - 1
    thickness = np.zeros(box.shape, dtype=np.int16)  # largest k < feather with the pixel in the opening by k
    eroded = box
    for k in range(1, feather):
        eroded = _erode(eroded)
        if not eroded.any():
            break
        depth += eroded
        thickness += dilate(eroded, k)  # openings shrink as k grows, so counting them gives the largest
    width = np.minimum(thickness + 1, feather)
    ramp = np.minimum(1.0, (depth + 1) / width)
    weights[top:bottom, left:right] = np.where(box, ramp, 0.0)
    return weights


def blend_mask(mask: Image.Image, feather: int) -> Image.Image:
    """The generated image's weight as an `L` image: 0 exactly outside the mask, ramping up to 255 inside it."""
    inside = np.asarray(mask.convert("L")) >= 128
    return Image.fromarray(np.rint(blend_weights(inside, feather) * 255).astype(np.uint8), mode="L")


def paste_back(generated: Image.Image, source: Image.Image, mask: Image.Image, feather: int) -> Image.Image:
    """The generated image inside the mask, `source` outside it (resized first if the output's size differs)."""
    if source.size != generated.size:
        source = source.resize(generated.size, Image.Resampling.LANCZOS)
        mask = mask.resize(generated.size, Image.Resampling.NEAREST)
    return Image.composite(generated.convert("RGB"), source, blend_mask(mask, feather))


@hookimpl(tryfirst=True)
def inpaint_postprocess(job, images: list) -> list | None:
    if job.request.output_type == "latent":
        return None
    feather = job.options("paste_back").feather
    return [paste_back(image, job.image, job.mask, feather) for image in images]
