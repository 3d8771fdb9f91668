"""Live previews: every `preview_every` steps, a small RGB picture of the current latents, stored beside the outputs.

Not a VAE decode: a linear map from latent channels to RGB, derived once per pipeline by
decoding one latent per channel (the VAE's own colours, linearised around zero). Its cost
per preview is a matrix product on the latent grid; bench/preview.py measures it.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import torch
from PIL import Image

from ..errors import StorageError
from ..hooks import hookimpl

log = logging.getLogger(__name__)

PREVIEW_WIDTH = 256
_maps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


@torch.no_grad()
def latent_rgb_map(pipe: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [channels, 3], bias [3]): RGB in [-1, 1] of a normalised latent, linearised around zero."""
    if id(pipe) not in _maps:
        vae = pipe.vae
        channels = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, channels, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, channels, 1, 1, 1)
        probes = torch.cat([torch.zeros(1, channels), torch.eye(channels)]).view(channels + 1, channels, 1, 1, 1)
        probes = probes.expand(-1, -1, -1, 4, 4) * std + mean  # the pipeline's un-normalisation before decoding
        param = next(vae.parameters())
        rgb = torch.cat([vae.decode(p.unsqueeze(0).to(param.device, param.dtype), return_dict=False)[0]
                         for p in probes]).float().mean(dim=(2, 3, 4)).cpu()  # [channels + 1, 3]
        _maps[id(pipe)] = (rgb[1:] - rgb[0], rgb[0])
    return _maps[id(pipe)]


def render_preview(pipe: Any, latents: torch.Tensor, height: int, width: int) -> Image.Image:
    weights, bias = latent_rgb_map(pipe)
    grid = pipe._unpack_latents(latents[:1], height, width, pipe.vae_scale_factor)[0, :, 0]  # [C, h, w]
    rgb = torch.einsum("chw,cd->hwd", grid.float().cpu(), weights) + bias
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    scale = PREVIEW_WIDTH / image.width
    return image.resize((PREVIEW_WIDTH, max(1, round(image.height * scale))), Image.Resampling.BILINEAR)


@hookimpl
def inpaint_step_end(job: Any, step: int, total_steps: int, latents: torch.Tensor) -> None:
    every = job.request.preview_every
    if not every or (step % every and step != total_steps) or job.state.get("previews_failed"):
        return
    image = render_preview(job.pipe, latents, job.params["height"], job.params["width"])
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    try:
        location, url = job.sink.put(f"previews/{job.image_index}-{step:04d}.jpg", buffer.getvalue(), "image/jpeg")
    except StorageError as error:  # a preview is a nicety: the job goes on, without further previews
        job.state["previews_failed"] = True
        log.warning("previews stop for this job: %s", error)
        return
    job.tracker.preview(url or location)
