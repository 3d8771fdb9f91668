"""The worker's `QwenImageInpaintPipeline`: upstream's call with `latents` fixed, and its speed options.

It imports only torch and diffusers, so `bench/gpu.py` times exactly what the worker runs, on a GPU
host that has none of the project's other dependencies.

Speed options, lossless (the same image up to floating-point noise) but for the step cache:
- a cache of prompt embeddings (`prompt_cache_size`): the text encoder is deterministic, so a
  repeated prompt, a negative prompt most of all, reuses its embeddings;
- batched true CFG (`batch_cfg`): each step's cond and uncond transformer passes run as one batch
  of two, the shorter text padded and masked out;
- `speed_up`: a diffusers attention backend, and regional compilation of the repeated
  transformer blocks (compiled once, with dynamic shapes, so new sizes and prompt lengths reuse it).

Lossy, opt-in: the first-block step cache (`speed_up(step_cache=...)`) and float8 blocks
(`quantize_blocks_fp8`).
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import QwenImageInpaintPipeline

log = logging.getLogger(__name__)
MASK_GRIDS = ("max_pool", "upstream")


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


class CfgBatcher:
    """The transformer's forward during one call: a step's cond pass runs cond and uncond as one batch.

    Upstream calls the transformer twice a step, with the same latents: first with the prompt's
    embeddings, then with the negative prompt's. The first call here runs both and keeps the
    uncond half; the second returns it. Anything else (no CFG, embeddings replaced by a
    step callback) runs as upstream does.
    """

    def __init__(self, transformer: torch.nn.Module):
        self.transformer, self.forward = transformer, transformer.forward
        self.texts: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.joint: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (latents, uncond output) of this step

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        pending, self.pending = self.pending, None
        if args or kwargs.get("return_dict", True) or len(self.texts) != 2:
            return self.forward(*args, **kwargs)
        (cond, _), (uncond, _) = self.texts
        latents, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        if text is uncond and pending is not None and pending[0] is latents:
            return (pending[1],)
        if text is not cond:
            return self.forward(**kwargs)
        joint_text, joint_mask = self.joint = self.joint or self._join()
        if joint_mask is not None and getattr(self.transformer, "_attention_takes_no_mask", False):
            return self.forward(**kwargs)
        both = dict(kwargs, hidden_states=torch.cat([latents, latents]), encoder_hidden_states=joint_text,
                    encoder_hidden_states_mask=joint_mask, timestep=torch.cat([kwargs["timestep"]] * 2),
                    img_shapes=list(kwargs["img_shapes"]) * 2)
        if kwargs.get("guidance") is not None:
            both["guidance"] = torch.cat([kwargs["guidance"]] * 2)
        try:
            output = self.forward(**both)[0]
        except ValueError as error:
            if joint_mask is None or "attn_mask" not in str(error):
                raise
            log.warning("the attention backend takes no mask: cond and uncond run apart when their prompts "
                        "differ in length (%s)", error)
            self.transformer._attention_takes_no_mask = True
            return self.forward(**kwargs)
        cond_output, uncond_output = output.chunk(2)
        self.pending = (latents, uncond_output)
        return (cond_output,)

    def _join(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both texts in one batch, padded to the longer; a mask only where one is needed."""
        (cond, cond_mask), (uncond, uncond_mask) = self.texts
        length = max(cond.shape[1], uncond.shape[1])
        if cond_mask is None and uncond_mask is None and cond.shape[1] == uncond.shape[1]:
            return torch.cat([cond, uncond]), None
        texts, masks = [], []
        for embeds, mask in self.texts:
            pad = length - embeds.shape[1]
            if mask is None:
                mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
            texts.append(torch.nn.functional.pad(embeds, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(mask.bool(), (0, pad)))
        return torch.cat(texts), torch.cat(masks)


def speed_up(pipe: InpaintPipeline, *, batch_cfg: bool = True, attention_backend: str | None = None,
             compile_blocks: bool = False, step_cache: float = 0.0) -> None:
    """Switch on the speed options; compilation happens on the next call (the warm-up's).

    `step_cache` is the one lossy option: diffusers' first-block cache, which skips the
    remaining blocks on a step whose first block changed less than this threshold.
    """
    pipe.batch_cfg = batch_cfg
    if attention_backend:
        pipe.transformer.set_attention_backend(attention_backend)
    if step_cache:
        from diffusers import FirstBlockCacheConfig

        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=step_cache))
    if compile_blocks:
        pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)


def uncompile_blocks(pipe: InpaintPipeline) -> None:
    """Undo `speed_up(compile_blocks=True)`: the transformer's blocks run eagerly again."""
    for block in pipe.transformer.transformer_blocks:
        block._compiled_call_impl = None  # what `Module.compile` set


FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def quantize_blocks_fp8(transformer: torch.nn.Module) -> int:
    """Lossy: the linear layers of the transformer's blocks become `Fp8Linear`s, where they are; returns how many.

    The blocks hold nearly all the transformer's weights, so its memory halves (from bfloat16).
    The worker runs it after the plugins' `inpaint_pipeline_loaded`, so a LoRA a plugin fuses into
    the weights (`pipe.fuse_lora()`) is quantized with them.
    """
    count = 0
    for block in transformer.transformer_blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                    setattr(parent, name, Fp8Linear(child))  # _scaled_mm needs both sizes in multiples of 16
                    count += 1
    return count


class Fp8Linear(torch.nn.Module):
    """A linear layer whose product runs in float8 (e4m3) through `torch._scaled_mm`.

    The weight is quantized once, with a scale per output channel; the input at each call, with
    a scale per token. The product accumulates in float32 and comes out in the input's dtype.
    On CUDA this needs float8 matrix units (compute capability 8.9 or newer); the CPU runs it too.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        scale = weight.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        self.register_buffer("weight", (weight / scale).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out_features)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def _apply(self, fn: Any, recurse: bool = True) -> Fp8Linear:
        """Moves apply; dtype casts (`module.to(torch.bfloat16)`) leave the weight float8 and its scale float32."""
        weight, scale = self.weight, self.weight_scale
        super()._apply(fn, recurse)
        if self.weight.dtype != weight.dtype:
            self.weight = weight.to(self.weight.device)
        if self.weight_scale.dtype != scale.dtype:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        quantized = (rows / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = torch._scaled_mm(quantized, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=bias,
                               out_dtype=x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
