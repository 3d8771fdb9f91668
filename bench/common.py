"""What the CPU benchmarks share: the project on the path, images as data: URLs, one job run in-process."""

from __future__ import annotations

import base64
import sys
import tempfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker import job  # noqa: E402
from worker.inputs import LocalFetcher  # noqa: E402
from worker.outputs import DirectorySink, encode_output  # noqa: E402
from worker.plugins import Plugins  # noqa: E402
from worker.schema import InpaintResult  # noqa: E402


def png_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_output(image, "png", quality=0)).decode()


def run_job(request: dict, model, settings) -> InpaintResult:
    """One job through `job.run` with the built-in plugins, its files in a temporary directory."""
    with tempfile.TemporaryDirectory() as out:
        return job.run(request, model=model, plugins=Plugins(load_entry_points=False), fetcher=LocalFetcher(10**9),
                       sink=DirectorySink(out), settings=settings)
