"""Loading the pipeline once per process (and warming it up), counting prompt tokens, seeded generators.

Device and dtype come from settings: one dtype for every component (bfloat16 on CUDA,
float32 on CPU; float16 gives NaNs for this model). Pipeline objects hold per-call
state, so a process runs one call at a time.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapters import Adapters
from .pipeline import InpaintPipeline
from .plugins import Plugins
from .settings import Settings
from .speed import quantize_blocks_fp8, speed_up, uncompile_blocks
from .tiny import TINY_MODEL_LABEL, build_tiny_model, is_tiny_model

log = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: dict[tuple, LoadedModel] = {}


@dataclass
class LoadedModel:
    pipe: InpaintPipeline
    name: str
    device: torch.device
    dtype: torch.dtype
    tiny: bool
    load_s: float
    compiled: bool = False
    attention_backend: str = "native"
    step_cache: float = 0.0
    fp8: bool = False
    warmup_s: float | None = None
    adapters: Adapters | None = None  # the adapter library and the transformer's LoRA slots, when configured

    @property
    def size_factor(self) -> int:
        """Heights and widths must be multiples of this (16 for Qwen-Image, 8 for the tiny model)."""
        return self.pipe.vae_scale_factor * 2

    @property
    def latent_channels(self) -> int:
        return self.pipe.latent_channels

    @property
    def guidance_distilled(self) -> bool:
        """Whether the transformer reads `guidance_scale` (Qwen-Image's does not: its true CFG is `true_cfg_scale`)."""
        return bool(self.pipe.transformer.config.guidance_embeds)

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
               "load_s": round(self.load_s, 3), "batch_cfg": self.pipe.batch_cfg, "compiled": self.compiled,
               "attention_backend": self.attention_backend, "step_cache": self.step_cache, "fp8": self.fp8}
        if self.warmup_s is not None:
            out["warmup_s"] = round(self.warmup_s, 3)
        if self.adapters is not None:
            out["adapter_slots"] = self.adapters.describe()
        if self.tiny:
            out["label"] = TINY_MODEL_LABEL
        return out


def resolve_device(settings: Settings) -> torch.device:
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


def resolve_dtype(settings: Settings, device: torch.device) -> torch.dtype:
    if settings.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, settings.dtype)


def model_path(settings: Settings) -> str:
    """The configured model, or the tiny model, built once under the cache directory."""
    if settings.model:
        return settings.model
    path = Path(settings.cache_dir) / "tiny-qwen-image"
    if not is_tiny_model(path):
        log.warning("INPAINT_MODEL is not set: building the %s at %s", TINY_MODEL_LABEL, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tiny-"))
        build_tiny_model(staging)
        try:
            os.rename(staging, path)  # atomic: a process racing us finds a whole model or none
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return str(path)


def load_model(settings: Settings, plugins: Plugins | None = None) -> LoadedModel:
    """Load the pipeline (cached per process and configuration); plugins hear of a fresh load."""
    device = resolve_device(settings)
    dtype = resolve_dtype(settings, device)
    with _lock:
        name = model_path(settings)
        key = (name, str(device), dtype, settings.offload, settings.prompt_cache_size, settings.batch_cfg,
               settings.attention_backend, settings.compile, settings.step_cache, settings.fp8,
               adapter_settings(settings))
        if key not in _loaded:
            if settings.offload != "none" and device.type != "cuda":
                raise ValueError(f"INPAINT_OFFLOAD={settings.offload} needs a CUDA device, not {device}")
            if settings.fp8:
                check_fp8(device, dtype)  # before minutes of loading
            started = time.monotonic()
            pipe = InpaintPipeline.from_pretrained(name, dtype=dtype)
            adapters = Adapters(pipe, settings) if settings.adapter_library else None  # slots before compiling
            if settings.offload == "model":
                pipe.enable_model_cpu_offload(device=device)
            elif settings.offload == "sequential":
                pipe.enable_sequential_cpu_offload(device=device)
            else:
                pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
            pipe.prompt_cache_size = settings.prompt_cache_size
            compiled = settings.compile == "on" or (settings.compile == "auto" and device.type == "cuda"
                                                    and not settings.step_cache)
            try:
                speed_up(pipe, batch_cfg=settings.batch_cfg, attention_backend=settings.attention_backend,
                         compile_blocks=compiled, step_cache=settings.step_cache)
            except (ValueError, RuntimeError) as error:
                if not settings.attention_backend:
                    raise
                raise ValueError(f"INPAINT_ATTENTION_BACKEND={settings.attention_backend}: {error}") from error
            _loaded[key] = LoadedModel(pipe, name if not is_tiny_model(name) else "tiny-qwen-image", device,
                                       dtype, is_tiny_model(name), time.monotonic() - started, compiled,
                                       settings.attention_backend or "native", settings.step_cache, settings.fp8,
                                       adapters=adapters)
            log.info("pipeline %s loaded on %s (%s) in %.1f s", name, device, dtype, _loaded[key].load_s)
            if plugins is not None:
                plugins.pipeline_loaded(pipe, settings)
            if settings.fp8:  # after the plugins' setup: a LoRA is loaded (and fused) into bfloat16 layers first
                quantize_blocks_fp8(pipe.transformer)
                free_memory(device)
        return _loaded[key]


def adapter_settings(settings: Settings) -> tuple:
    """What makes a pipeline's adapter library and slots: pipelines with other values are other pipelines."""
    return (settings.lora_dir, tuple(settings.lora_buckets), settings.lora_max_bytes, settings.lora_max_per_job,
            settings.lora_max_rank, settings.lora_cache_size, settings.lora_disk_cache_bytes, settings.fast_adapter,
            settings.fast_steps, settings.fast_shift) if settings.adapter_library else ()


def check_fp8(device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ValueError(f"INPAINT_FP8 needs float8 matrix units, compute capability 8.9 or newer (L4, L40S, "
                         f"RTX 4090, H100, ...): {device} ({torch.cuda.get_device_name(device)}) is "
                         f"{capability[0]}.{capability[1]}")
    if dtype != torch.bfloat16:  # cuBLAS's row-wise scaled products give bfloat16
        raise ValueError(f"INPAINT_FP8 on CUDA computes in bfloat16: leave INPAINT_DTYPE at auto or bfloat16, not "
                         f"{str(dtype).removeprefix('torch.')}")


def wants_warm_up(settings: Settings, model: LoadedModel) -> bool:
    """`auto` warms up on CUDA, and wherever blocks are compiled: otherwise the first job compiles them."""
    if settings.warmup == "off" and model.compiled:
        log.warning("INPAINT_WARMUP=off with compiled blocks: the first jobs will compile them (minutes)")
    return settings.warmup == "on" or (settings.warmup == "auto" and (model.device.type == "cuda" or model.compiled))


def warm_up(model: LoadedModel, size: int, steps: int = 2) -> float:
    """Small jobs at the serving size, so the first real job finds kernels loaded, tuned and compiled.

    Compiled blocks need one graph per kind of step (sizes and prompt lengths are dynamic within
    each): true CFG with prompts of different lengths (a masked batch of two when batched), true
    CFG with prompts of one length, and no CFG (a batch of one).

    They run in a thread that ends with them. A thread that ran torch's CPU operators keeps its
    OpenMP thread team, and that team then competes with the job thread's: run from the worker's
    main thread, a warm-up made every later job's pipeline call on a CPU worker slower
    (docs/BENCHMARKS.md).
    """
    with ThreadPoolExecutor(1, thread_name_prefix="warm-up") as thread:  # leaving the block ends the thread
        return thread.submit(_warm_up, model, size, steps).result()


def _warm_up(model: LoadedModel, size: int, steps: int) -> float:
    from PIL import Image

    size = max(model.size_factor, size // model.size_factor * model.size_factor)
    started = time.monotonic()
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    image = Image.new("RGB", (size, size), (128, 128, 128))
    kinds = [("warm-up", "a longer negative prompt for the warm-up", 4.0)]
    if model.compiled:
        kinds += [("warm-up", "warm-up", 4.0), ("warm-up", None, 1.0)]

    def run(prompt: str, negative_prompt: str | None, true_cfg_scale: float) -> None:
        model.pipe(prompt=prompt, negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale, image=image,
                   mask_image=mask, height=size, width=size, num_inference_steps=steps, strength=1.0,
                   generator=generator(0))

    try:
        for kind in kinds:
            run(*kind)
    except Exception as error:
        if not model.compiled:
            raise
        log.error("compiling the transformer's blocks failed, so they run uncompiled (INPAINT_COMPILE=off skips "
                  "the attempt): %s", error)
        uncompile(model)
        run(*kinds[0])
    return time.monotonic() - started


def uncompile(model: LoadedModel) -> None:
    uncompile_blocks(model.pipe)
    model.compiled = False


def count_prompt_tokens(model: LoadedModel, prompt: str) -> int:
    """The prompt's own tokens, without the pipeline's chat template around it."""
    return sequence_length(model, prompt) - template_closing_tokens(model)


def template_closing_tokens(model: LoadedModel) -> int:
    """Tokens the chat template adds after every prompt (`<|im_end|>`, the assistant's turn): the pipeline keeps them
    in the sequence that `max_sequence_length` cuts, so they take room from the prompt."""
    return sequence_length(model, "")


def sequence_length(model: LoadedModel, prompt: str) -> int:
    """The length of the prompt's embeddings: the templated prompt's tokens, less the template's prefix upstream
    drops (`_get_qwen_prompt_embeds`)."""
    pipe = model.pipe
    ids = pipe.tokenizer(pipe.prompt_template_encode.format(prompt)).input_ids
    return len(ids) - pipe.prompt_template_encode_start_idx


def generator(seed: int) -> torch.Generator:
    """A CPU generator: the same seed gives the same noise on every device."""
    return torch.Generator(device="cpu").manual_seed(seed)


def free_memory(device: torch.device) -> None:
    """Let go of what nothing uses now: unreachable cycles, and on CUDA the allocator's cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
