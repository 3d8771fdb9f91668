"""Fast mode against the standard job, and what adapters cost: first load, cached, swap, the slots themselves.

    python bench/adapters.py [--size 128] [--repeats 3] [--quick]

All in one process, on the configured model (INPAINT_MODEL, else the tiny random-weight model), with a library of
random-weight LoRAs written for it (Qwen-Image-Lightning's rank, 64, on every linear layer; kohya's format with
alphas). The denoising stage of the standard job (50 steps at strength 0.6: 30 run, true CFG: 60 transformer
passes, batched two at a time) against fast mode's (8 steps at strength 1, no CFG: 8 passes), and the standard job
on a worker without slots against one with; medians of --repeats jobs, ratios within this run. Then
`Adapters.apply` timed: an adapter not in memory (read, converted, checked, copied into a slot), one in memory and
already in its slot, and a swap between two in memory. On the tiny CPU model a step is cheap and an adapter small:
the ratio of passes is what carries over to a GPU, not the seconds (bench/gpu.py measures fast mode there).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import png_url, run_job
from PIL import Image
from safetensors.torch import save_file

from worker.model import load_model
from worker.schema import AdapterRef
from worker.settings import Settings

LIGHTNING_RANK, LIGHTNING_ALPHA = 64, 8


def write_library(model, folder: Path, names: list[str]) -> None:
    """Random LoRAs of Lightning's rank and alpha on every linear layer, in kohya's layout (what trainers write)."""
    linears = {n: m for n, m in model.pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    for seed, name in enumerate(names):
        generator = torch.Generator().manual_seed(seed)
        state = {}
        for layer, module in linears.items():
            key = f"lora_unet_{layer.replace('.', '_')}"
            state[f"{key}.lora_down.weight"] = torch.randn(LIGHTNING_RANK, module.in_features,
                                                           generator=generator) / module.in_features ** 0.5
            up = torch.randn(module.out_features, LIGHTNING_RANK, generator=generator)
            state[f"{key}.lora_up.weight"] = up * 0.01
            state[f"{key}.alpha"] = torch.tensor(float(LIGHTNING_ALPHA))
        save_file(state, folder / f"{name}.safetensors")


def median_denoising(request: dict, model, settings: Settings, repeats: int) -> tuple[float, int]:
    results = [run_job(request, model, settings) for _ in range(repeats + 1)][1:]  # the first warms up
    return statistics.median(r.timings["denoising"] for r in results), results[0].parameters.steps_run


def timed_apply(adapters, wanted: list[AdapterRef]) -> float:
    started = time.perf_counter()
    adapters.apply(wanted)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: keeps the script working in the tests")
    args = parser.parse_args()
    size, repeats, steps = (32, 1, 10) if args.quick else (args.size, args.repeats, 50)
    folder = Path(tempfile.mkdtemp(prefix="bench-loras-"))
    plain = Settings(progress_interval_s=0)
    plain_model = load_model(plain)
    write_library(plain_model, folder, ["lightning", "style-a", "style-b"])
    settings = plain.model_copy(update={"lora_dir": folder, "fast_adapter": "lightning"})
    model = load_model(settings)
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    base = {"prompt": "a bench in a park", "image": png_url(Image.effect_noise((size, size), 40).convert("RGB")),
            "mask_image": png_url(mask), "seed": 0}
    standard = {**base, "negative_prompt": "blurry", "true_cfg_scale": 4.0, "num_inference_steps": steps,
                "strength": 0.6}
    fast = {**base, "mode": "fast", "strength": 1.0}
    print(f"model {model.name} on {model.device} ({torch.get_num_threads()} threads), {size}x{size}, "
          f"median of {repeats}")

    no_slots, n = median_denoising(standard, plain_model, plain, repeats)
    with_slots, _ = median_denoising(standard, model, settings, repeats)
    fast_s, fast_n = median_denoising(fast, model, settings, repeats)
    print(f"standard job ({steps} steps at strength 0.6, {n} run, true CFG: {2 * n} transformer passes): "
          f"denoising {no_slots * 1000:.0f} ms")
    print(f"fast mode ({fast_n} steps, no CFG: {fast_n} passes, Lightning-rank adapter): denoising "
          f"{fast_s * 1000:.0f} ms; standard / fast = {with_slots / fast_s:.1f}x (passes: {2 * n / fast_n:.1f}x)")
    print(f"adapter slots ({settings.lora_max_per_job} of rank {settings.lora_max_rank} on every linear layer) on "
          f"the standard job with no adapter: {with_slots * 1000:.0f} ms against {no_slots * 1000:.0f} ms without "
          f"slots, ratio {with_slots / no_slots:.2f}")

    adapters = model.adapters
    first, cached, swap = [], [], []
    for _ in range(max(repeats, 3)):
        adapters.loaded.clear()
        adapters.apply([])
        first.append(timed_apply(adapters, [AdapterRef(ref="style-a")]))
        cached.append(timed_apply(adapters, [AdapterRef(ref="style-a")]))
        timed_apply(adapters, [AdapterRef(ref="style-b")])  # in memory now
        swap.append(timed_apply(adapters, [AdapterRef(ref="style-a")]))
    file_mb = (folder / "style-a.safetensors").stat().st_size / 1e6
    print(f"adapter ({file_mb:.1f} MB file, rank {LIGHTNING_RANK}): first load {statistics.median(first) * 1000:.1f} "
          f"ms (read, convert, check, copy into its slot); cached and in its slot "
          f"{statistics.median(cached) * 1000:.2f} ms; swap between two cached "
          f"{statistics.median(swap) * 1000:.2f} ms")


if __name__ == "__main__":
    main()
