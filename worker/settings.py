"""One settings object for the worker, read from `INPAINT_*` environment variables and validated at start."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INPAINT_", extra="ignore")

    model: str | None = Field(
        None,
        description="Hub id (e.g. Qwen/Qwen-Image) or local directory of the pipeline. "
        "Unset: a tiny random-weight model is built once in the cache directory (for trying it out).",
    )
    device: str = Field("auto", description="torch device: auto (cuda if present, else cpu), cuda, cuda:1, cpu")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="One dtype for all components: auto is bfloat16 on CUDA, float32 on CPU"
    )
    offload: Literal["none", "model", "sequential"] = Field(
        "none", description="CPU offload for GPUs smaller than the model: model (per component) or sequential"
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "qwen-inpaint-worker", description="Where the tiny model is built"
    )
    max_pixels: int = Field(2_097_152, gt=0, description="Pixel budget of one output image (width x height)")
    max_steps: int = Field(200, gt=0, description="Largest num_inference_steps a job may ask for")
    max_images: int = Field(8, gt=0, description="Most images one job may produce")
    max_deadline_s: float = Field(1800.0, gt=0, description="Longest a job may run; also the default deadline")
    data_url_max_bytes: int = Field(20_000_000, gt=0, description="Largest decoded data: URL input")
    plugins_blocked: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated plugin names never to load"
    )
    progress_interval_s: float = Field(0.25, ge=0, description="Least time between two progress reports")

    @field_validator("plugins_blocked", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
