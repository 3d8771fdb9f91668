"""Cost of a live preview against the cost of a denoising step, in the same process.

    python bench/preview.py [--size 512] [--steps 8] [--quick]

Times a denoising step (best of three jobs) and what the preview hook does per preview
(render + JPEG + write, median of 20) on the configured model (INPAINT_MODEL, else the
tiny random-weight model), and prints both and their ratio. On the tiny CPU model a step is cheap, so
the ratio overstates what a preview costs beside a real model's step.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time

import torch
from common import png_url, run_job
from PIL import Image

from worker.builtin.preview import render_preview
from worker.model import load_model
from worker.outputs import DirectorySink
from worker.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: keeps the script working in the tests")
    args = parser.parse_args()
    size, steps = (64, 2) if args.quick else (args.size, args.steps)
    settings = Settings(progress_interval_s=0)
    model = load_model(settings)
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    request = {"prompt": "a bench", "image": png_url(Image.new("RGB", (size, size), (90, 120, 150))),
               "mask_image": png_url(mask), "num_inference_steps": steps, "strength": 1.0, "seed": 0}

    def timed(**extra: object) -> dict:
        return run_job({**request, **extra}, model, settings).timings

    timed()  # warm-up
    per_step = min(timed()["denoising"] for _ in range(3)) / steps
    packed = torch.randn(1, (size // model.size_factor) ** 2, model.latent_channels * 4)
    costs = []
    with tempfile.TemporaryDirectory() as out:
        sink = DirectorySink(out)
        for index in range(20):  # what the preview hook does per preview
            started = time.perf_counter()
            buffer = io.BytesIO()
            render_preview(model.pipe, packed, size, size).save(buffer, format="JPEG", quality=80)
            sink.put(f"previews/0-{index:04d}.jpg", buffer.getvalue(), "image/jpeg")
            costs.append(time.perf_counter() - started)
    per_preview = sorted(costs)[len(costs) // 2]
    print(f"model {model.name} on {model.device}, {size}x{size}, {steps} steps")
    print(f"step: {per_step * 1000:.1f} ms; preview (render + JPEG + write, median of 20): "
          f"{per_preview * 1000:.2f} ms; preview / step = {per_preview / per_step:.3f}")


if __name__ == "__main__":
    main()
