"""Where a job's files go. The local runner writes to a directory; the queue's S3 sink replaces it."""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from .io_pool import at_once

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp",
                 "latent": "application/octet-stream", "json": "application/json"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp", "latent": "safetensors"}


class OutputSink(Protocol):
    def put(self, name: str, data: bytes, content_type: str) -> tuple[str, str | None]:
        """Store `data` under `name` (e.g. `0.png`); return its location and a URL to fetch it, if any."""
        ...


class DirectorySink:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def put(self, name: str, data: bytes, content_type: str) -> tuple[str, str | None]:
        path = self.directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path), None


def put_all(sink: OutputSink, files: list[tuple[str, bytes, str]]) -> list[tuple[str, str | None]]:
    """Store the files at once (each can be a network round trip); the first failure, in order, is raised."""
    return [put.result() for put in at_once(*(partial(sink.put, *file) for file in files))]


def encode_output(image: Any, output_type: str, quality: int) -> bytes:
    """The bytes of one output: an image file, or the packed latents as safetensors."""
    if output_type == "latent":
        from safetensors.torch import save

        return save({"latents": image.detach().cpu().contiguous()})
    buffer = io.BytesIO()
    if output_type == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format=output_type.upper(), quality=quality)
    return buffer.getvalue()
