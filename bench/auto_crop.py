"""Time saved by the automatic crop: a small mask on a big image, with and without `auto_crop`.

    python bench/auto_crop.py [--size 2048] [--mask 256] [--steps 10] [--quick]

Same job twice in one process on the configured model (INPAINT_MODEL, else the tiny
random-weight model): the whole image at its own size, then the crop path. Prints both times
and their ratio.
"""

from __future__ import annotations

import argparse
import time

from common import png_url, run_job
from PIL import Image

from worker.model import load_model
from worker.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--mask", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: keeps the script working in the tests")
    args = parser.parse_args()
    if args.quick:
        args.size, args.mask, args.steps = 256, 16, 2
    settings = Settings(max_pixels=args.size * args.size)
    model = load_model(settings)
    image = Image.effect_noise((args.size, args.size), 40).convert("RGB")
    mask = Image.new("L", image.size, 0)
    corner = args.size // 2 - args.mask // 2
    mask.paste(255, (corner, corner, corner + args.mask, corner + args.mask))
    request = {"prompt": "a bench", "image": png_url(image), "mask_image": png_url(mask),
               "num_inference_steps": args.steps, "strength": 1.0, "seed": 0}

    def timed(plugins: dict) -> tuple[float, dict]:
        started = time.perf_counter()
        result = run_job({**request, "plugins": plugins}, model, settings)
        return time.perf_counter() - started, result.parameters.model_dump()

    timed({"auto_crop": {"enabled": True}})  # warm-up
    whole, whole_params = timed({})
    crop, crop_params = timed({"auto_crop": {"enabled": True}})
    print(f"model {model.name} on {model.device}: {args.mask}x{args.mask} mask on {args.size}x{args.size}, "
          f"{args.steps} steps")
    print(f"whole image ({whole_params['width']}x{whole_params['height']}): {whole:.2f} s; auto crop "
          f"({crop_params['processing_width']}x{crop_params['processing_height']} + paste back): {crop:.2f} s; "
          f"{whole / crop:.1f}x faster")


if __name__ == "__main__":
    main()
