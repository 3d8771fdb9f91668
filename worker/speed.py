"""The pipeline's speed options, lossless (the same image up to floating-point noise) but for the step cache:

- a cache of prompt embeddings (`InpaintPipeline.prompt_cache_size`): the text encoder is deterministic,
  so a repeated prompt, a negative prompt most of all, reuses its embeddings;
- batched true CFG (`CfgBatcher`, `batch_cfg`): each step's cond and uncond transformer passes run as
  one batch of two, the shorter text padded and masked out;
- `speed_up`: a diffusers attention backend, and regional compilation of the repeated transformer
  blocks (compiled once, with dynamic shapes, so new sizes and prompt lengths reuse it).

Lossy, opt-in: the first-block step cache (`speed_up(step_cache=...)`) and float8 blocks
(`quantize_blocks_fp8`). Imports only torch and diffusers, like worker.pipeline.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .pipeline import InpaintPipeline

log = logging.getLogger(__name__)


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
        for path, parent in list(block.named_modules()):
            if ".lora_" in f".{path}":  # adapter slots (worker.adapters) stay as they are: jobs swap weights into them
                continue
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
