"""Where a job's files go. The local runner writes to a directory; the queue's S3 sink replaces it."""

from __future__ import annotations

import io
import logging
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from .io_pool import at_once

log = logging.getLogger(__name__)

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp",
                 "latent": "application/octet-stream", "json": "application/json"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp", "latent": "safetensors"}
MAX_SIDE = {"webp": 16383, "jpeg": 65500}  # what the formats can hold (PNG: 2**31 - 1)


class OutputSink(Protocol):
    def put(self, name: str, data: bytes, content_type: str) -> tuple[str, str | None]:
        """Store `data` under `name` (e.g. `0.png`); return its location and a URL to fetch it, if any."""
        ...

    def delete(self, names: list[str]) -> None:
        """Remove files this job stored (a job that failed while storing its outputs leaves none behind)."""
        ...


class DirectorySink:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def put(self, name: str, data: bytes, content_type: str) -> tuple[str, str | None]:
        path = self.directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path), None

    def delete(self, names: list[str]) -> None:
        for name in names:
            (self.directory / name).unlink(missing_ok=True)


def put_all(sink: OutputSink, files: list[tuple[str, bytes, str]]) -> list[tuple[str, str | None]]:
    """Store the files at once (each can be a network round trip). When one fails, those stored are removed
    and the first failure, in order, is raised."""
    puts = at_once(*(partial(sink.put, *file) for file in files))
    failed = [put.exception() for put in puts if put.exception() is not None]
    if failed:
        remove(sink, [name for (name, _, _), put in zip(files, puts, strict=True) if put.exception() is None])
        raise failed[0]
    return [put.result() for put in puts]


def remove(sink: OutputSink, names: list[str]) -> None:
    """Best effort: a failed job's outputs are removed, and a failure to remove them is logged, not raised."""
    if not names:
        return
    try:
        sink.delete(names)
    except Exception as error:
        log.warning("could not remove %s after the job failed: %s", ", ".join(names), error)


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
