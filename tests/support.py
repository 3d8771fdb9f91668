"""Helpers the tests share: deterministic pictures, data: URLs, an in-process job runner, S3 uploads."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def photo(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    """A deterministic picture with structure (gradient, shapes, grain)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 128.0)], axis=-1)
    image = Image.fromarray(np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype("uint8"))
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, width // 2, height // 2), fill=(200, 40, 40))
    return image


def box_mask(width: int = 64, height: int = 64, box: tuple[int, int, int, int] = (16, 16, 40, 40)) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=255)
    return mask


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Runner:
    """Runs jobs in-process against the session's model, writing to a temp directory."""

    def __init__(self, model, plugins, settings, directory: Path):
        self.model, self.plugins, self.settings, self.directory = model, plugins, settings, directory
        self.count = 0

    def request(self, **fields) -> dict:
        fields.setdefault("prompt", "a red apple on a table")
        fields.setdefault("image", data_url(photo()))
        fields.setdefault("mask_image", data_url(box_mask()))
        fields.setdefault("num_inference_steps", 4)
        fields.setdefault("seed", 1)
        fields = {k: v for k, v in fields.items() if v is not None or k == "seed"}
        return fields

    def run(self, manager=None, reporter=None, **fields):
        from worker import job
        from worker.inputs import LocalFetcher
        from worker.outputs import DirectorySink

        self.count += 1
        out = self.directory / f"job{self.count}"
        kwargs = {"reporter": reporter} if reporter else {}
        result = job.run(self.request(**fields), model=self.model, plugins=manager or self.plugins,
                         fetcher=LocalFetcher(self.settings.data_url_max_bytes), sink=DirectorySink(out),
                         settings=self.settings, **kwargs)
        return result

    @staticmethod
    def pixels(result, index: int = 0) -> np.ndarray:
        return np.asarray(Image.open(result.images[index].location).convert("RGB")).astype(int)


def upload(stack, key: str, image: Image.Image, bucket: str = "inputs") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    stack.s3.client().put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())
    return f"s3://{bucket}/{key}"


def job_request(stack, **fields) -> dict:
    """A small valid queued job, its inputs uploaded to the stack's S3; fields override."""
    fields.setdefault("prompt", "a red apple")
    fields.setdefault("image", upload(stack, "photo.png", photo()))
    fields.setdefault("mask_image", upload(stack, "mask.png", box_mask()))
    fields.setdefault("num_inference_steps", 4)
    fields.setdefault("seed", 1)
    return fields
