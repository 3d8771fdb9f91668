"""Loading the pipeline once per process, and running it for one image.

Device and dtype come from settings: one dtype for every component (bfloat16 on CUDA,
float32 on CPU; float16 gives NaNs for this model). Pipeline objects hold per-call
state, so a process runs one call at a time.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import QwenImageInpaintPipeline

from .plugins import Plugins
from .settings import Settings
from .tiny import TINY_MODEL_LABEL, build_tiny_model, is_tiny_model

log = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: dict[tuple, LoadedModel] = {}


class InpaintPipeline(QwenImageInpaintPipeline):
    """`QwenImageInpaintPipeline` with `latents` working as documented, and a cache of prompt embeddings.

    Upstream returns the given latents alone from `prepare_latents`, where the caller
    unpacks three values, so any `latents` argument crashes. Here given latents are the
    starting noise in the packed layout (what `output_type="latent"` returns), noised
    onto the image exactly as the generator's noise would be.

    The text encoder is deterministic, so a repeated prompt (a negative prompt most of all)
    reuses its embeddings: the same tensors, the same images.
    """

    prompt_cache_size = 0

    def _get_qwen_prompt_embeds(self, prompt=None, device=None, dtype=None):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not self.prompt_cache_size or len(prompts) != 1:
            return super()._get_qwen_prompt_embeds(prompt, device, dtype)
        key = (prompts[0], str(device or self._execution_device), dtype or self.text_encoder.dtype)
        cache = self.__dict__.setdefault("_prompt_cache", OrderedDict())
        if key not in cache:
            cache[key] = super()._get_qwen_prompt_embeds(prompt, device, dtype)
            while len(cache) > self.prompt_cache_size:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return cache[key]

    def prepare_latents(self, image, timestep, batch_size, num_channels_latents, height, width, dtype, device,
                        generator, latents=None):
        if latents is None:
            return super().prepare_latents(image, timestep, batch_size, num_channels_latents, height, width,
                                           dtype, device, generator)
        h = 2 * (int(height) // (self.vae_scale_factor * 2))
        w = 2 * (int(width) // (self.vae_scale_factor * 2))
        image = image.unsqueeze(2) if image.dim() == 4 else image
        image = image.to(device=device, dtype=dtype)
        image_latents = self._encode_vae_image(image=image, generator=generator)
        image_latents = torch.cat([image_latents] * (batch_size // image_latents.shape[0]), dim=0)
        image_latents = self._pack_latents(image_latents.transpose(1, 2), batch_size, num_channels_latents, h, w)
        noise = latents.to(device=device, dtype=dtype)
        return self.scheduler.scale_noise(image_latents, timestep, noise), noise, image_latents


@dataclass
class LoadedModel:
    pipe: InpaintPipeline
    name: str
    device: torch.device
    dtype: torch.dtype
    tiny: bool
    load_s: float
    warmup_s: float | None = None

    @property
    def size_factor(self) -> int:
        """Heights and widths must be multiples of this (16 for Qwen-Image, 8 for the tiny model)."""
        return self.pipe.vae_scale_factor * 2

    @property
    def latent_channels(self) -> int:
        return self.pipe.latent_channels

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
               "load_s": round(self.load_s, 3)}
        if self.warmup_s is not None:
            out["warmup_s"] = round(self.warmup_s, 3)
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
        key = (name, str(device), dtype, settings.offload)
        if key not in _loaded:
            if settings.offload != "none" and device.type != "cuda":
                raise ValueError(f"INPAINT_OFFLOAD={settings.offload} needs a CUDA device, not {device}")
            started = time.monotonic()
            pipe = InpaintPipeline.from_pretrained(name, dtype=dtype)
            if settings.offload == "model":
                pipe.enable_model_cpu_offload(device=device)
            elif settings.offload == "sequential":
                pipe.enable_sequential_cpu_offload(device=device)
            else:
                pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
            pipe.prompt_cache_size = settings.prompt_cache_size
            _loaded[key] = LoadedModel(pipe, name if not is_tiny_model(name) else "tiny-qwen-image", device,
                                       dtype, is_tiny_model(name), time.monotonic() - started)
            log.info("pipeline %s loaded on %s (%s) in %.1f s", name, device, dtype, _loaded[key].load_s)
            if plugins is not None:
                plugins.for_job(()).call("inpaint_pipeline_loaded", pipe=pipe, settings=settings)
        return _loaded[key]


def warm_up(model: LoadedModel, size: int, steps: int = 2) -> float:
    """One small job at the serving size, so the first real job finds kernels loaded and tuned."""
    from PIL import Image

    size = max(model.size_factor, size // model.size_factor * model.size_factor)
    started = time.monotonic()
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    model.pipe(prompt="warm-up", negative_prompt="warm-up", image=Image.new("RGB", (size, size), (128, 128, 128)),
               mask_image=mask, height=size, width=size, num_inference_steps=steps, strength=1.0,
               generator=generator(0))
    return time.monotonic() - started


def count_prompt_tokens(model: LoadedModel, prompt: str) -> int:
    """Tokens the pipeline keeps for `prompt` (its template's prefix is dropped)."""
    pipe = model.pipe
    ids = pipe.tokenizer(pipe.prompt_template_encode.format(prompt)).input_ids
    return len(ids) - pipe.prompt_template_encode_start_idx


def generator(seed: int) -> torch.Generator:
    """A CPU generator: the same seed gives the same noise on every device."""
    return torch.Generator(device="cpu").manual_seed(seed)
