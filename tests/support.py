"""Helpers the tests share: deterministic pictures, data: URLs, an in-process job runner, S3 uploads, and what
a queued job leaves behind (its objects and pixels in S3, its runs in the testkit plugin's log, its progress), a
client of a Redis that is not there."""

from __future__ import annotations

import base64
import io
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

BROKER_PASSWORD = "hunter2-Zq9"  # in dead_client's broker URL: what a client reports must never show it


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

    def run(self, manager=None, reporter=None, *, settings=None, sink=None, cancel_requested=None, **fields):
        """One job through `job.run`; by default with the session's settings, into a folder of its own."""
        from worker import job
        from worker.inputs import LocalFetcher
        from worker.outputs import DirectorySink

        self.count += 1
        settings = settings or self.settings
        if sink is None:
            sink = DirectorySink(self.directory / f"job{self.count}")
        kwargs = {"reporter": reporter} if reporter else {}
        return job.run(self.request(**fields), model=self.model, plugins=manager or self.plugins,
                       fetcher=LocalFetcher(settings.data_url_max_bytes), sink=sink, settings=settings,
                       cancel_requested=cancel_requested, **kwargs)

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


def objects(stack, job_id: str) -> dict[str, str]:
    """What a job stored in S3 under the default prefix (outputs/jobs/<id>/): key -> ETag."""
    listing = stack.s3.client().list_objects_v2(Bucket="outputs", Prefix=f"jobs/{job_id}/")
    return {item["Key"]: item["ETag"] for item in listing.get("Contents", [])}


def outputs(stack, job_id: str) -> list[str]:
    """The names of a job's objects within its folder, sorted: ["0.png", "result.json"]."""
    return sorted(key.removeprefix(f"jobs/{job_id}/") for key in objects(stack, job_id))


def stored_pixels(stack, status, index: int = 0) -> np.ndarray:
    """The pixels of a queued job's image as stored in S3."""
    bucket, key = status.result.images[index].location.removeprefix("s3://").split("/", 1)
    body = stack.s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(int)


def runs(run_log: Path, job_id: str) -> tuple[int, int]:
    """How often the testkit plugin saw a job start and finish (its log: the id a start, done:<id> an end)."""
    words = run_log.read_text().split() if run_log.exists() else []
    return words.count(job_id), words.count(f"done:{job_id}")


def wait_for_step(client, job_id: str, step: int, timeout: float = 60) -> None:
    """Until a queued job's progress says it is denoising at `step` or later."""
    deadline = time.monotonic() + timeout
    while (progress := client.status(job_id).progress) is None or progress.stage != "denoising" \
            or progress.step < step:
        assert time.monotonic() < deadline, f"{job_id} never reached step {step}"
        time.sleep(0.02)


def dead_client(port: int | None = None):
    """A client of a Redis nobody listens on (a free loopback port), the way a backend builds one."""
    from worker.client import InpaintClient
    from worker.settings import Settings
    from worker.stack import free_port

    url = f"redis://:{BROKER_PASSWORD}@127.0.0.1:{port or free_port()}/0"
    return InpaintClient.from_settings(Settings(broker_url=url))


@contextmanager
def workers(stack, app, env: dict, *names: str) -> Iterator[list]:
    """Worker processes named `<name>@<this host>`, ready when the block starts and stopped when it ends (a frozen
    one is woken first: it could not stop)."""
    started = [stack.start_worker(f"{name}@{socket.gethostname()}", **env) for name in names]
    try:
        for worker in started:
            worker.wait_ready(app)
        yield started
    finally:
        for worker in started:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGCONT)
            worker.stop()
