"""One settings object for the worker, read from `INPAINT_*` environment variables and validated at start."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# what both kombu (the broker) and Celery (the result backend) take for Redis; they know no unix://
REDIS_SCHEMES = ("redis://", "rediss://", "redis+socket://")
SENTINEL_SCHEME = "sentinel://"  # Sentinels that name the master: sentinel://h1:26379;sentinel://h2:26379 (both)
SENTINEL_TIMEOUT_S = 5.0  # bounds a connect to, and a reply from, one Sentinel; the next one is asked after it
CERT_REQS = ("required", "optional", "none", "CERT_REQUIRED", "CERT_OPTIONAL", "CERT_NONE")  # what Celery takes


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="INPAINT_", extra="ignore",
        hide_input_in_errors=True,  # secrets: URLs with passwords
        allow_inf_nan=False,  # e.g. a visibility timeout of inf: Redis would never hand a dead worker's job on
    )

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
    max_pixels: int = Field(2_097_152, gt=0, description="Pixel budget of the size the model works at (width x height)")
    max_steps: int = Field(200, gt=0, description="Largest num_inference_steps a job may ask for")
    max_images: int = Field(8, gt=0, description="Most images one job may produce")
    max_deadline_s: float = Field(1800.0, gt=0, description="Longest a job may run; also the default deadline")
    data_url_max_bytes: int = Field(20_000_000, gt=0, description="Largest decoded data: URL input")
    plugins_blocked: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated plugin names never to load"
    )
    progress_interval_s: float = Field(0.25, ge=0, description="Least time between two progress reports")
    auto_crop: bool = Field(False, description="The auto_crop plugin on for every job (a request's option overrides)")
    prompt_cache_size: int = Field(32, ge=0, description="Prompts whose embeddings are kept for reuse (0: off)")
    batch_cfg: bool = Field(True, description="Run true CFG's cond and uncond passes as one batch of two")
    attention_backend: str | None = Field(
        None, description="diffusers attention backend (native, _native_cudnn, flash, _flash_3, ...); unset: native"
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="Regional torch.compile of the transformer's blocks, at warm-up: auto is on for CUDA"
    )
    step_cache: float = Field(
        0.0, ge=0, description="Lossy: first-block cache threshold (e.g. 0.1), skipping the other blocks on steps "
        "that change little; 0: off. Blocks are then not compiled"
    )
    fp8: bool = Field(
        False, description="Lossy: the transformer blocks' linear layers in float8 (e4m3), half the transformer's "
        "memory; CUDA needs compute capability 8.9+ (L4, L40S, RTX 4090, H100)"
    )
    warmup: Literal["auto", "on", "off"] = Field(
        "auto", description="Small jobs at worker start so the first real one is not slower: auto is on for CUDA "
        "or when compiling"
    )
    warmup_size: int = Field(1024, gt=0, description="Image size of the warm-up job")

    lora_dir: Path | None = Field(None, description="The adapter library's folder: <name>.safetensors per LoRA")
    lora_buckets: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated S3 buckets (bucket or bucket/prefix) of the adapter "
        "library: s3://bucket/prefix/<name>.safetensors"
    )
    lora_max_bytes: int = Field(4_000_000_000, gt=0, description="Largest adapter file a job may use")
    lora_max_per_job: int = Field(2, ge=1, le=8, description="Most adapters one job applies (each a slot in the "
                                  "transformer, whose cost every job pays)")
    lora_max_rank: int = Field(64, ge=1, le=1024, description="Largest LoRA rank; the slots' rank (Lightning's is 64)")
    lora_cache_size: int = Field(4, ge=1, description="Adapters kept loaded in memory, least recently used out")
    lora_disk_cache_bytes: int = Field(20_000_000_000, ge=0, description="Bytes of S3 adapter files kept on disk "
                                       "(in INPAINT_CACHE_DIR/adapters), least recently used out")
    fast_adapter: str | None = Field(None, description="Fast mode's distilled LoRA, a name in the adapter library "
                                     "(e.g. Qwen-Image-Lightning's 8-step one); unset: no fast mode")
    fast_steps: int = Field(8, ge=1, description="Fast mode's num_inference_steps (a request may set its own)")
    fast_shift: float = Field(3.0, gt=0, le=100, description="Fast mode's scheduler shift (Lightning was distilled "
                              "with 3)")

    broker_url: str = Field("redis://localhost:6379/0", description="Celery broker (Redis), or the Sentinels that "
                            "name its master: sentinel://:pw@h1:26379;sentinel://:pw@h2:26379 (pw: the master's)")
    result_backend: str | None = Field(None, description="Celery result backend; defaults to the broker")
    redis_master_name: str | None = Field(None, description="The master's name in Sentinel (`sentinel monitor "
                                          "<name> ...`): required with sentinel:// URLs, for broker and backend")
    redis_sentinel_password: SecretStr | None = Field(None, description="The Sentinels' own password (their "
                                                      "requirepass), if they have one; never logged")
    queue: str = Field("celery", description="The queue workers consume and jobs are sent to")
    result_expires_s: int = Field(86400, gt=0, description="How long job states and results stay in Redis")
    visibility_timeout_s: float = Field(
        3600.0, gt=0, description="Redis redelivers a job not acked in this time: must exceed the longest job"
    )
    unacked_restore_interval_s: float = Field(10.0, gt=0, description="How often a worker looks for lost jobs")
    unacked_restore_throttle: int = Field(10, ge=1, description="Look only every Nth time (1: every time)")
    s3_endpoint_url: str | None = Field(None, description="S3 API endpoint (MinIO, ...); unset: AWS")
    s3_public_endpoint_url: str | None = Field(
        None, description="S3 endpoint as browsers and web backends reach it, in presigned URLs (results; the example "
        "backend's uploads), where the workers' name for S3 is another (http://minio:9000 in compose); unset: "
        "INPAINT_S3_ENDPOINT_URL"
    )
    output_bucket: str | None = Field(None, description="Bucket the worker writes results to")
    output_prefix: str = Field("jobs", description="Key prefix of results: {prefix}/{job_id}/{index}.{ext}")
    input_buckets: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated buckets that s3:// inputs may come from"
    )
    http_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated hosts that https:// inputs may come from"
    )
    input_max_bytes: int = Field(50_000_000, gt=0, description="Largest input object read from S3 or https")
    presign_expiry_s: int = Field(3600, gt=0, le=604800, description="Lifetime of the presigned URLs in results "
                                  "(at most 7 days, what S3's signatures allow)")
    storage_attempts: int = Field(5, ge=1, description="Tries of each S3 call and https input before storage_error")
    storage_backoff_s: float = Field(0.5, ge=0, description="First wait between S3 tries; doubles each time")
    log_format: Literal["text", "json"] = Field("text", description="Worker log lines: text, or one JSON object each")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Worker log level, in any case: DEBUG, INFO, WARNING, ERROR, CRITICAL"
    )
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Serve Prometheus metrics here; launch gives worker i this port + i"
    )
    metrics_address: str = Field("127.0.0.1", description="Address the metrics server binds (0.0.0.0 in containers)")

    deadline_margin_s: float = Field(
        120.0, ge=0, description="Time a job may take past its deadline (the last step, decoding, uploads)"
    )

    @model_validator(mode="after")
    def _visibility_covers_the_longest_job(self) -> Settings:
        if self.visibility_timeout_s <= self.max_deadline_s + self.deadline_margin_s:
            raise ValueError(
                f"INPAINT_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s:g}) must exceed INPAINT_MAX_DEADLINE_S "
                f"({self.max_deadline_s:g}) plus INPAINT_DEADLINE_MARGIN_S ({self.deadline_margin_s:g}): otherwise "
                "Redis hands a job that is still running to a second worker"
            )
        return self

    @model_validator(mode="after")
    def _step_cache_or_compile(self) -> Settings:
        if self.step_cache and self.compile == "on":
            raise ValueError("INPAINT_STEP_CACHE and INPAINT_COMPILE=on exclude each other: the cache's hooks "
                             "break the compiled blocks' graphs (leave INPAINT_COMPILE at auto or off)")
        return self

    @model_validator(mode="after")
    def _fp8_not_sequentially_offloaded(self) -> Settings:
        if self.fp8 and self.offload == "sequential":
            raise ValueError("INPAINT_FP8 and INPAINT_OFFLOAD=sequential exclude each other: sequential offload "
                             "keeps a module's buffers (the float8 weights) on the GPU; use INPAINT_OFFLOAD=model")
        return self

    @model_validator(mode="after")
    def _adapters_need_a_library(self) -> Settings:
        if (self.lora_dir or self.lora_buckets) and self.offload == "sequential":
            raise ValueError("INPAINT_LORA_DIR/INPAINT_LORA_BUCKETS and INPAINT_OFFLOAD=sequential exclude each "
                             "other: sequential offload keeps the weights adapters are swapped into off the device; "
                             "use INPAINT_OFFLOAD=model")
        if self.fast_adapter and not (self.lora_dir or self.lora_buckets):
            raise ValueError("INPAINT_FAST_ADAPTER names an adapter in the library: set INPAINT_LORA_DIR or "
                             "INPAINT_LORA_BUCKETS too")
        if self.fast_adapter is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", self.fast_adapter):
            raise ValueError("INPAINT_FAST_ADAPTER must be an adapter's name in the library (letters, digits, "
                             "'_', '-', '.'), not a path or URL")
        if self.fast_steps > self.max_steps:
            raise ValueError(f"INPAINT_FAST_STEPS ({self.fast_steps}) is over INPAINT_MAX_STEPS ({self.max_steps})")
        return self

    @property
    def adapter_library(self) -> bool:
        """Whether jobs may use adapters: a library is configured."""
        return bool(self.lora_dir or self.lora_buckets)

    @field_validator("log_level", mode="before")
    @classmethod
    def _known_log_level(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"{value!r} is not a log level: use {', '.join(LOG_LEVELS)} (in any case)")
        return level

    @field_validator("result_backend", "s3_endpoint_url", "s3_public_endpoint_url", "redis_master_name",
                     "redis_sentinel_password", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value  # INPAINT_RESULT_BACKEND= in a .env

    @field_validator("s3_endpoint_url", "s3_public_endpoint_url")
    @classmethod
    def _endpoint_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"https?://[^/?#\s]+", value):
            raise ValueError("must be an http:// or https:// URL, e.g. http://minio:9000 (unset: AWS)")
        return value

    @field_validator("broker_url", "result_backend")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("rediss://"):
            reqs = parse_qs(urlsplit(value).query).get("ssl_cert_reqs", [""])[-1]
            if reqs not in CERT_REQS:
                raise ValueError("a rediss:// URL needs ?ssl_cert_reqs=required (or optional, or none: no certificate "
                                 "check), the TLS certificate check Celery's Redis client must be told")
        if value is None or value.startswith(REDIS_SCHEMES):
            return value
        if value.startswith(SENTINEL_SCHEME):
            return sentinel_urls(value)
        # only the scheme is shown: the rest of the URL may hold a password
        scheme = re.match(r"[a-z][a-z0-9+.-]{0,15}(?=://)", value)
        found = f"scheme {scheme.group(0)}://" if scheme else "no scheme"
        raise ValueError(f"must be a Redis URL starting with {', '.join(REDIS_SCHEMES)}, not one with {found} "
                         "(a Unix socket: redis+socket:///path/to/redis.sock), or Sentinels: "
                         "sentinel://h1:26379;sentinel://h2:26379")

    @field_validator("queue")
    @classmethod
    def _queue_name(cls, value: str) -> str:
        from .queues import QUEUE_PATTERN

        if not re.fullmatch(QUEUE_PATTERN, value):
            raise ValueError(f"must be a queue name matching {QUEUE_PATTERN} (letters, digits, '_', '.', '-')")
        return value

    @property
    def backend_url(self) -> str:
        return self.result_backend or self.broker_url

    @model_validator(mode="after")
    def _sentinels_need_a_master_name(self) -> Settings:
        sentinels = any(url.startswith(SENTINEL_SCHEME) for url in (self.broker_url, self.backend_url))
        if sentinels and not self.redis_master_name:
            raise ValueError("INPAINT_REDIS_MASTER_NAME must be set with sentinel:// URLs: the name the Sentinels "
                             "know the master by (`sentinel monitor <name> <host> <port> <quorum>`)")
        if not sentinels and (self.redis_master_name or self.redis_sentinel_password):
            raise ValueError("INPAINT_REDIS_MASTER_NAME and INPAINT_REDIS_SENTINEL_PASSWORD are for sentinel:// "
                             "URLs, and neither INPAINT_BROKER_URL nor INPAINT_RESULT_BACKEND is one")
        return self

    def redis_transport_options(self, url: str) -> dict:
        """What kombu (broker) and Celery (backend) need beside a sentinel:// URL: the master's name, and how to
        talk to the Sentinels themselves (their password; timeouts, so a Sentinel that hangs is skipped for the
        next). Nothing for a plain Redis URL."""
        if not url.startswith(SENTINEL_SCHEME):
            return {}
        sentinel_kwargs: dict = {"socket_connect_timeout": SENTINEL_TIMEOUT_S, "socket_timeout": SENTINEL_TIMEOUT_S}
        if self.redis_sentinel_password is not None:
            sentinel_kwargs["password"] = self.redis_sentinel_password.get_secret_value()
        return {"master_name": self.redis_master_name, "sentinel_kwargs": sentinel_kwargs}

    @field_validator("lora_dir", "fast_adapter", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("plugins_blocked", "input_buckets", "http_allow", "lora_buckets", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("http_allow")
    @classmethod
    def _lowercase_hosts(cls, value: list[str]) -> list[str]:
        return [host.lower().strip("[]") for host in value]  # as urlsplit gives a URL's hostname: no IPv6 brackets


def sentinel_urls(value: str) -> str:
    """`sentinel://[:password@]host:port[/db]`, one per Sentinel, joined by `;` (kombu's and Celery's form)."""
    for part in value.split(";"):
        if not part.startswith(SENTINEL_SCHEME) or not urlsplit(part).hostname:
            raise ValueError("must list Sentinels as sentinel://host:port, joined by ';' (sentinel://:password@"
                             "h1:26379/0;sentinel://:password@h2:26379/0, the password being the master's), each "
                             "one with a host")
    return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
