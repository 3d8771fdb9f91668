"""Input normalisation: EXIF orientation, RGB (alpha over white, 16-bit scaled), and the default size."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from ..hooks import hookimpl


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB, transparent pixels laid over `background` (white for pictures; the mask plugin keeps them: black)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit and 32-bit grayscale: scale to 8 bits instead of clipping at 255
        array = np.asarray(image, dtype=np.float32)  # float64 would double the memory a 50 MP input takes
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def default_size(job, width: int, height: int) -> tuple[int, int]:
    """The input's size (scaled to the pixel budget, rounded to the size factor), or the one asked for."""
    asked_w, asked_h = job.params.get("width"), job.params.get("height")
    if asked_w and asked_h:
        return asked_w, asked_h
    f = job.limits.size_factor
    if asked_w:
        return asked_w, max(f, round(asked_w * height / width / f) * f)
    if asked_h:
        return max(f, round(asked_h * width / height / f) * f), asked_h
    return job.limits.default_size(width, height)


@hookimpl(tryfirst=True)
def inpaint_preprocess(job) -> None:
    job.image = to_rgb(ImageOps.exif_transpose(job.image))
    job.mask = ImageOps.exif_transpose(job.mask)
    job.params["width"], job.params["height"] = default_size(job, *job.image.size)
