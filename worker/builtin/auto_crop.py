"""Automatic crop: a small mask on a big image is inpainted in its own region, not across the whole picture.

Opt-in (it changes the result: the model sees less context), per job with
`"plugins": {"auto_crop": {"enabled": true}}` or per worker with `INPAINT_AUTO_CROP=1`. It sets
`padding_mask_crop` and a processing size that fits the region, so the pipeline works on the
crop and pastes it back into the full image; pixels outside the crop are the input's. The
processing size keeps to the worker's pixel budget (`INPAINT_MAX_PIXELS`) the way the whole
image's default size does: a region larger than the budget is processed scaled down. A job that
sets `height` or `width` itself asks for that output size, so it is not cropped.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict, Field

from ..hooks import hookimpl

log = logging.getLogger(__name__)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON types, as the request

    enabled: bool | None = Field(None, description="default: the worker's INPAINT_AUTO_CROP")
    margin: int = Field(32, ge=1, le=1024, description="Context around the mask, in pixels")
    max_fraction: float = Field(0.25, gt=0, le=1, description="Crop only when the region is at most this much of "
                                                              "the image")


def crop_size(mask_box: tuple[int, int, int, int], image_size: tuple[int, int], margin: int,
              factor: int) -> tuple[int, int]:
    left, top, right, bottom = mask_box
    width = min(image_size[0], right - left + 2 * margin)
    height = min(image_size[1], bottom - top + 2 * margin)
    return max(factor, -(-width // factor) * factor), max(factor, -(-height // factor) * factor)


@hookimpl
def inpaint_preprocess(job) -> None:
    options = job.options("auto_crop")
    enabled = job.settings.auto_crop if options.enabled is None else options.enabled
    box = job.mask.getbbox()
    if not enabled or job.params.get("padding_mask_crop") is not None or box is None \
            or job.request.output_type == "latent" \
            or job.request.height is not None or job.request.width is not None:  # the job chose its size
        return
    width, height = crop_size(box, job.image.size, options.margin, job.limits.size_factor)
    if width * height > options.max_fraction * job.image.width * job.image.height:
        return
    fitted = job.limits.default_size(width, height)  # within the pixel budget, rounded to the size factor
    if fitted != (width, height):
        log.info("auto_crop: the %dx%d region is over the pixel budget of %d; processing it at %dx%d", width, height,
                 job.limits.max_pixels, *fitted)
    width, height = fitted
    job.params.update(padding_mask_crop=options.margin, width=width, height=height)
