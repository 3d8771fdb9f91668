"""The worker's pipeline: `QwenImageInpaintPipeline` with `latents` fixed, the mask on the latent grid, a prompt
cache and batched CFG (worker.speed holds the speed options, worker.model loads it).

It imports only torch and diffusers (and worker.speed, which does too), so `bench/gpu.py` times exactly
what the worker runs, on a GPU host that has none of the project's other dependencies.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import QwenImageInpaintPipeline

from .speed import CfgBatcher

log = logging.getLogger(__name__)
MASK_GRIDS = ("max_pool", "upstream")
# Qwen-Image-Lightning's scheduler (its authors' generate_with_diffusers.py), with base_shift = max_shift = log(shift):
# the same shift at every image size
SHIFTED_SCHEDULE = dict(shift=1.0, use_dynamic_shifting=True, shift_terminal=None, time_shift_type="exponential",
                        invert_sigmas=False, stochastic_sampling=False, use_karras_sigmas=False,
                        use_exponential_sigmas=False, use_beta_sigmas=False)


def upstream_signature(upstream: Callable) -> Callable[[Callable], Callable]:
    """Give an override declared `(*args, **kwargs)` the signature of the upstream method it passes them to, and
    upstream's documentation after its own: `help()`, `inspect.signature` (diffusers' own tests, wrappers that keep
    the keyword arguments a callable takes) see upstream's parameters, for the diffusers version installed."""
    def keep(method: Callable) -> Callable:
        method.__signature__ = inspect.signature(upstream)
        method.__doc__ = f"{inspect.cleandoc(method.__doc__ or '')}\n\nUpstream's documentation:\n\n" \
                         f"{inspect.cleandoc(upstream.__doc__ or '')}"
        return method
    return keep


class InpaintPipeline(QwenImageInpaintPipeline):
    """`QwenImageInpaintPipeline` with `latents` working as documented, every latent cell the mask touches
    repainted (unless `mask_grid` is "upstream"), a prompt cache, batched CFG, and without upstream's unused VAE
    encode of the masked image. `__call__` and `encode_prompt` show upstream's signatures.

    Upstream returns the given latents alone from `prepare_latents`, where the caller
    unpacks three values, so any `latents` argument crashes. Here given latents are the
    starting noise in the packed layout (what `output_type="latent"` returns), noised
    onto the image exactly as the generator's noise would be.
    """

    prompt_cache_size = 0
    batch_cfg = False
    mask_grid = "max_pool"  # or "upstream": see prepare_mask_latents
    _batcher: CfgBatcher | None = None

    @upstream_signature(QwenImageInpaintPipeline.__call__)
    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Upstream's call, with the changes the class describes."""
        try:
            return self._call(*args, **kwargs)
        except BaseException:
            # Upstream resets stateful hooks (the step cache's tensors from this call) and offloads only at the end of a
            # call that finishes; after one that raised (cancel, deadline, out of memory) the next call of another size
            # would compare its tensors with this one's and fail.
            self.maybe_free_model_hooks()
            raise

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        if not self.batch_cfg:
            return super().__call__(*args, **kwargs)
        transformer = self.transformer
        own_forward = transformer.__dict__.get("forward")  # offload hooks wrap forward on the instance
        self._batcher = transformer.forward = CfgBatcher(transformer)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._batcher = None
            if own_forward is None:
                del transformer.forward
            else:
                transformer.forward = own_forward

    @contextmanager
    def mask_grid_as(self, mask_grid: str) -> Iterator[None]:
        """Calls inside the block bring the mask onto the latent grid as `mask_grid` says (see prepare_mask_latents)."""
        if mask_grid not in MASK_GRIDS:
            raise ValueError(f"mask_grid {mask_grid!r}: expected one of {', '.join(MASK_GRIDS)}")
        before, self.mask_grid = self.__dict__.get("mask_grid"), mask_grid
        try:
            yield
        finally:
            if before is None:
                del self.mask_grid  # the class's default again
            else:
                self.mask_grid = before

    @contextmanager
    def scheduler_shift_as(self, shift: float | None) -> Iterator[None]:
        """Calls inside the block run a flow-matching schedule shifted by `shift` at every size: what a distilled
        LoRA was trained with (Qwen-Image-Lightning: 3). None: the model's own scheduler. Restored on leaving."""
        if shift is None:
            yield
            return
        own = self.scheduler
        self.scheduler = type(own).from_config(own.config, **SHIFTED_SCHEDULE, base_shift=math.log(shift),
                                               max_shift=math.log(shift))
        try:
            yield
        finally:
            self.scheduler = own

    @upstream_signature(QwenImageInpaintPipeline.encode_prompt)
    def encode_prompt(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Upstream's, noting the embeddings for batched CFG."""
        embeds, mask = super().encode_prompt(*args, **kwargs)
        if self._batcher is not None:
            self._batcher.texts.append((embeds, mask))  # the prompt's, then the negative prompt's
        return embeds, mask

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

    def prepare_mask_latents(self, mask, masked_image, batch_size, num_channels_latents, num_images_per_prompt,
                             height, width, dtype, device, generator):
        """Upstream's mask latents, with two changes.

        With `mask_grid` "max_pool" (the default), every latent cell the mask touches is repainted: upstream
        samples one pixel a cell (nearest), so a stroke a few pixels wide between the samples was left as it
        was, the job reporting success. A mask on the cell grid gives upstream's mask exactly. With "upstream"
        the mask is sampled as upstream samples it, for results identical to a direct call.

        The masked image is not encoded: upstream encodes it with the VAE and never reads the result
        (Qwen-Image's transformer takes no masked image), which costs one VAE encode a call. A zero latent
        of the right shape takes its place (so `masked_image_latents` changes nothing, as upstream).
        """
        h, w = 2 * (int(height) // (self.vae_scale_factor * 2)), 2 * (int(width) // (self.vae_scale_factor * 2))
        if self.mask_grid == "max_pool":
            mask = torch.nn.functional.adaptive_max_pool2d(mask, (h, w))  # upstream's resize is then the identity
        unused = torch.zeros((1, self.latent_channels, 1, h, w), device=device, dtype=dtype)
        return super().prepare_mask_latents(mask, unused, batch_size, num_channels_latents, num_images_per_prompt,
                                            height, width, dtype, device, generator)

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


MOVED = {name: "worker.model" for name in ("LoadedModel", "load_model", "warm_up", "wants_warm_up", "generator",
                                           "model_path", "free_memory", "count_prompt_tokens")}


def __getattr__(name: str) -> Any:
    """worker.pipeline held the model's loading until 2026-12 (now worker.model): its names still work here,
    deprecated."""
    if name not in MOVED:
        raise AttributeError(f"module 'worker.pipeline' has no attribute {name!r}")
    import importlib
    import warnings

    warnings.warn(f"worker.pipeline.{name} is deprecated: import it from {MOVED[name]}", DeprecationWarning,
                  stacklevel=2)
    return getattr(importlib.import_module(MOVED[name]), name)
