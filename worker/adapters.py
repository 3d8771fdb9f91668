"""Adapters (LoRA) per job: the operator's library, its caches, the slots adapters are swapped into, fast mode.

A job names adapters in the operator's library (`INPAINT_LORA_DIR`, `INPAINT_LORA_BUCKETS`), never a path or URL;
files are safetensors, read with `safetensors` only (a pickle is refused unread). Formats are converted by diffusers'
own Qwen-Image loader (`lora_state_dict`: diffusers, kohya, ComfyUI and ai-toolkit, PEFT's `default.` names).

The transformer holds `INPAINT_LORA_MAX_PER_JOB` LoRA slots of rank `INPAINT_LORA_MAX_RANK` on each of its linear
layers, added once at load with diffusers' `enable_lora_hotswap` (scalings become tensors, ranks padded), before the
blocks are compiled. A job copies its adapters into the slots in place, as peft's hotswap does, and zeros the slots it
does not use: switching adapters reloads nothing and recompiles nothing. Every job writes every slot before its first
step, so a job without adapters runs the base model plus exact zeros (what a worker without slots gives) whatever the
job before it did or however it ended. Loaded adapters are kept in memory, and S3 files on disk, least recently used
out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import InvalidRequest
from .schema import AdapterRef, AdapterUsed, check_schedule
from .settings import Settings
from .slots import Slots

if TYPE_CHECKING:
    from .job import Job
    from .model import LoadedModel
    from .schema import InpaintRequest

log = logging.getLogger(__name__)
SUFFIX = ".safetensors"
PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # torch.save's pickle, and its zip archive


@dataclass(frozen=True)
class Adapter:
    """A loaded adapter: per linear layer its down and up weights (on the slots' device) and its alpha / rank."""

    name: str
    sha256: str
    key: tuple  # where it was read from and which version: a changed file is another adapter
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def plan_adapters(request: InpaintRequest, settings: Settings, params: dict[str, Any]) -> list[AdapterRef]:
    """A job's adapters before the preprocess hooks: the request's; in fast mode the worker's distilled adapter
    first, with fast mode's steps (unless the request sets its own) and true CFG off (`params` is changed)."""
    adapters = list(request.adapters)
    if request.mode != "fast":
        return adapters
    if not settings.fast_adapter:
        raise InvalidRequest("mode", "this worker has no fast mode (its operator set no INPAINT_FAST_ADAPTER); "
                             "use \"standard\"")
    if "num_inference_steps" not in request.model_fields_set:
        params["num_inference_steps"] = settings.fast_steps
        try:
            check_schedule(params["num_inference_steps"], params["strength"], params["sigmas"])
        except InvalidRequest as error:
            raise InvalidRequest(error.field, f"{error.detail} (fast mode runs {settings.fast_steps} steps unless "
                                 "num_inference_steps is given)") from None
    params["true_cfg_scale"] = 1.0  # distilled without CFG: a second pass would only cost time
    return [AdapterRef(ref=settings.fast_adapter, shift=settings.fast_shift), *adapters]


def use_adapters(job: Job, model: LoadedModel) -> None:
    """Load the job's adapters (`job.adapters`, as the preprocess hooks left them) and write them into the slots,
    before any step runs; records them in `job.adapters_used` and the schedule they ask for in `job.scheduler_shift`.
    """
    wanted = [entry if isinstance(entry, AdapterRef) else hook_entry(entry, index)
              for index, entry in enumerate(job.adapters)]
    if model.adapters is None:
        if wanted:
            raise InvalidRequest("adapters", "this worker has no adapter library (its operator set neither "
                                 "INPAINT_LORA_DIR nor INPAINT_LORA_BUCKETS)")
        return
    attention = dict(job.params["attention_kwargs"] or {})
    lora_scale = attention.pop("scale", 1.0)  # upstream's LoRA scale: every adapter's, applied in the slots
    job.params["attention_kwargs"] = attention or None
    job.adapters_used, job.scheduler_shift = model.adapters.apply(wanted, lora_scale)


def hook_entry(entry: Any, index: int) -> AdapterRef:
    """An adapter a preprocess hook put in `job.adapters` as a dict, checked as a request's."""
    from pydantic import ValidationError

    from .errors import describe_invalid

    try:
        return AdapterRef.model_validate(entry)
    except ValidationError as error:
        field, message = describe_invalid(error)
        raise InvalidRequest(f"adapters.{index}.{field}".rstrip("."), f"{message} (set by a preprocess hook)") from None


class Adapters:
    """The adapter library of one loaded pipeline: where files come from, the caches, the slots."""

    def __init__(self, pipe: Any, settings: Settings):
        self.settings = settings
        self.slots = Slots(pipe, settings.lora_max_per_job, settings.lora_max_rank)
        self.loaded: OrderedDict[tuple, Adapter] = OrderedDict()
        self.disk = Path(settings.cache_dir) / "adapters"
        self._s3: Any = None

    def describe(self) -> dict[str, Any]:
        return {"slots": len(self.slots.names), "rank": self.slots.rank}

    def apply(self, wanted: list[AdapterRef], lora_scale: float = 1.0) -> tuple[list[AdapterUsed], float | None]:
        """Load and check every adapter first (a refused one changes no slot), then write the slots."""
        most = len(self.slots.names)
        if len(wanted) > most:
            raise InvalidRequest("adapters", f"{len(wanted)} adapters (fast mode's included); this worker applies at "
                                 f"most {most} a job (INPAINT_LORA_MAX_PER_JOB)")
        shifts = sorted({entry.shift for entry in wanted if entry.shift is not None})
        if len(shifts) > 1:
            raise InvalidRequest("adapters", f"the adapters ask for different scheduler shifts ({shifts}); a job runs "
                                 "one schedule")
        loaded = [self.load(entry.ref, f"adapters.{index}.ref") for index, entry in enumerate(wanted)]
        scales = [entry.scale * lora_scale for entry in wanted]
        self.slots.write(list(zip(loaded, scales, strict=True)))
        used = [AdapterUsed(name=entry.ref, sha256=adapter.sha256, scale=scale, shift=entry.shift)
                for entry, adapter, scale in zip(wanted, loaded, scales, strict=True)]
        return used, shifts[0] if shifts else None

    def load(self, name: str, field: str) -> Adapter:
        """The adapter `name` from memory, else from the library (the folder first, then the buckets)."""
        from . import metrics

        key, size, fetch = self.locate(name, field)
        if key in self.loaded:
            self.loaded.move_to_end(key)
            metrics.ADAPTER_USES.labels("memory").inc()
            return self.loaded[key]
        started = time.monotonic()
        path, source = fetch()
        try:
            adapter = read_adapter(path, name, field, key, self.slots)
        except FileNotFoundError:  # another worker of this host made room in the shared disk cache just now
            path, source = fetch()
            adapter = read_adapter(path, name, field, key, self.slots)
        self.loaded[key] = adapter
        while len(self.loaded) > self.settings.lora_cache_size:
            self.loaded.popitem(last=False)
        metrics.ADAPTER_USES.labels(source).inc()
        metrics.ADAPTER_LOAD_SECONDS.observe(time.monotonic() - started)
        log.info("adapter %s loaded from %s in %.2f s (sha256 %s)", name, source, time.monotonic() - started,
                 adapter.sha256[:12])
        return adapter

    def locate(self, name: str, field: str) -> tuple[tuple, int, Any]:
        """Where `name` is: its cache key (its place and version), size, and how to get a local file of it."""
        settings = self.settings
        if settings.lora_dir is not None:
            path = Path(settings.lora_dir) / f"{name}{SUFFIX}"
            if path.is_file():
                stat = path.stat()
                self.check_size(stat.st_size, name, field)
                return ("file", str(path), stat.st_mtime_ns, stat.st_size), stat.st_size, lambda: (path, "library")
        for entry in settings.lora_buckets:
            bucket, _, prefix = entry.partition("/")
            key = f"{prefix.strip('/')}/{name}{SUFFIX}".lstrip("/")
            head = self.head(bucket, key, field)
            if head is not None:
                size, etag = head["ContentLength"], head.get("ETag", "")
                self.check_size(size, name, field)
                return ("s3", bucket, key, etag), size, partial(self.download, bucket, key, etag, size, field)
        places = ([str(settings.lora_dir)] if settings.lora_dir else []) + [f"s3://{b}" for b in settings.lora_buckets]
        raise InvalidRequest(field, f"no adapter named {name!r} in this worker's library ({', '.join(places)})")

    def check_size(self, size: int, name: str, field: str) -> None:
        if size > self.settings.lora_max_bytes:
            raise InvalidRequest(field, f"adapter {name!r} is {size} bytes, over this worker's cap of "
                                 f"{self.settings.lora_max_bytes} (INPAINT_LORA_MAX_BYTES)")

    @property
    def s3(self) -> Any:
        if self._s3 is None:
            from .storage import s3_client

            self._s3 = s3_client(self.settings)
        return self._s3

    def head(self, bucket: str, key: str, field: str) -> dict | None:
        from botocore.exceptions import ClientError

        from .retries import with_retries
        from .storage import NOT_FOUND, s3_trouble

        try:
            return with_retries(self.settings, f"{field}: looking up s3://{bucket}/{key}",
                                lambda: self.s3.head_object(Bucket=bucket, Key=key), s3_trouble, field=field)
        except ClientError as error:
            if str(error.response.get("Error", {}).get("Code")) in NOT_FOUND:
                return None
            raise

    def download(self, bucket: str, key: str, etag: str, size: int, field: str) -> tuple[Path, str]:
        """The object as a file in the disk cache (downloaded unless it is there), named by its place and version."""
        from .retries import with_retries
        from .storage import s3_trouble

        path = self.disk / f"{hashlib.sha256(f'{bucket}/{key}@{etag}'.encode()).hexdigest()[:40]}{SUFFIX}"
        if path.is_file() and path.stat().st_size == size:
            os.utime(path)  # recently used
            return path, "disk"
        self.disk.mkdir(parents=True, exist_ok=True)
        self.make_room(size)
        handle, staging = tempfile.mkstemp(dir=self.disk, prefix=".download-")
        os.close(handle)
        try:
            with_retries(self.settings, f"{field}: downloading s3://{bucket}/{key}",
                         lambda: self.s3.download_file(bucket, key, staging), s3_trouble, field=field)
            os.replace(staging, path)  # whole or not at all
        finally:
            Path(staging).unlink(missing_ok=True)
        return path, "s3"

    def make_room(self, size: int) -> None:
        """Remove the least recently used files until `size` more bytes fit INPAINT_LORA_DISK_CACHE_BYTES. The
        workers of a host share the folder: a file another one removed meanwhile is passed over."""
        files = []
        for path in self.disk.glob(f"*{SUFFIX}"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        files.sort()
        total = sum(size for _, size, _ in files)
        for _, file_size, path in files:
            if total + size <= self.settings.lora_disk_cache_bytes:
                break
            path.unlink(missing_ok=True)
            total -= file_size


def read_adapter(path: Path, name: str, field: str, key: tuple, slots: Slots) -> Adapter:
    """Read a safetensors file (never a pickle), convert it as diffusers' Qwen-Image loader does, and check that it
    fits this transformer: every layer one of its linear layers, shapes that fit, a rank within the slots'."""
    with open(path, "rb") as file:
        head = file.read(8)
    if head.startswith(PICKLE_MAGIC):
        raise InvalidRequest(field, f"adapter {name!r} is a pickle (torch.save) file, refused unread: pickles can run "
                             "code when read; convert it to safetensors")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            tensors = {k: file.get_tensor(k) for k in file.keys()}  # noqa: SIM118 (safe_open has no iteration)
    except Exception as error:
        raise InvalidRequest(field, f"adapter {name!r} is not a readable safetensors file ({error})") from None
    layers = fitted_layers(converted(tensors, name, field), lora_config(metadata), name, field, slots)
    return Adapter(name=name, sha256=file_sha256(path), key=key, layers=layers)


def converted(tensors: dict[str, torch.Tensor], name: str, field: str) -> dict[str, torch.Tensor]:
    """The file's weights in diffusers' layout (`<layer>.lora_A.weight`, `<layer>.lora_B.weight`, under the
    transformer), by diffusers' own conversion of the trainers' formats."""
    from diffusers import QwenImageInpaintPipeline

    state = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}  # PEFT's save_pretrained
    try:
        state = QwenImageInpaintPipeline.lora_state_dict(state)
    except Exception as error:
        raise InvalidRequest(field, f"adapter {name!r} is not a LoRA in a format this worker reads (diffusers, kohya, "
                             f"ComfyUI, ai-toolkit, PEFT): {str(error)[:300]}") from None
    if state and not any(k.startswith("transformer.") for k in state):
        state = {f"transformer.{k}": v for k, v in state.items()}  # the transformer's own names, without the prefix
    outside = sorted(k for k in state if not k.startswith("transformer."))
    if outside:
        raise InvalidRequest(field, f"adapter {name!r} holds weights outside the transformer ({outside[0]!r}); this "
                             "worker applies LoRAs to the transformer only")
    return {k.removeprefix("transformer."): v for k, v in state.items()}


def lora_config(metadata: dict[str, str]) -> dict[str, Any]:
    """The LoRA's rank and alpha settings diffusers writes into the file (`lora_adapter_metadata`); {} without."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        return {}
    return {k.removeprefix("transformer."): v for k, v in config.items()} if isinstance(config, dict) else {}


def fitted_layers(state: dict[str, torch.Tensor], config: dict[str, Any], name: str, field: str,
                  slots: Slots) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    def refuse(message: str) -> InvalidRequest:
        return InvalidRequest(field, f"adapter {name!r} does not fit this model: {message}")

    if config.get("use_dora"):
        raise refuse("it is a DoRA, which cannot be swapped into LoRA slots")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        layer, _, kind = key.rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise refuse(f"it holds {key!r}, which is not a LoRA down or up weight (DoRA, LoRA biases and full-weight "
                         "differences are not supported)")
        pairs.setdefault(layer, {})[kind[0]] = value
    if not pairs:
        raise refuse("it holds no LoRA weights")
    device, dtype = slots.device, next(iter(slots.layers.values())).get_base_layer().weight.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):  # FP8 blocks: the LoRA stays in bfloat16
        dtype = torch.bfloat16
    fitted = {}
    for layer, pair in sorted(pairs.items()):
        if len(pair) != 2:
            raise refuse(f"layer {layer!r} has only its lora_{next(iter(pair))} weight")
        target = slots.layers.get(layer)
        if target is None:
            raise refuse(f"{layer!r} is not a linear layer of this model's transformer (a LoRA for another model?)")
        a, b = pair["A"], pair["B"]
        base = target.get_base_layer()
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != base.in_features or b.shape[0] != base.out_features \
                or a.shape[0] != b.shape[1]:
            raise refuse(f"layer {layer!r} maps {base.in_features} to {base.out_features} features here; the LoRA's "
                         f"down weight is {list(a.shape)} and its up weight {list(b.shape)} (a LoRA for another model "
                         "or size?)")
        if a.shape[0] > slots.rank:
            raise refuse(f"layer {layer!r} has rank {a.shape[0]}, over this worker's {slots.rank} "
                         "(INPAINT_LORA_MAX_RANK)")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise refuse(f"layer {layer!r} holds NaN or infinite weights")
        fitted[layer] = (a.to(device, dtype), b.to(device, dtype), scaling(config, layer, a.shape[0]))
    return fitted


def scaling(config: dict[str, Any], layer: str, rank: int) -> float:
    """alpha / rank as peft computes it from diffusers' metadata (per-layer patterns, rsLoRA); 1 without metadata:
    diffusers' conversions fold the trainers' alphas into the weights."""
    if not config:
        return 1.0
    from peft.utils.other import get_pattern_key

    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = ranks.get(get_pattern_key(ranks.keys(), layer), config.get("r", rank)) if ranks else config.get("r", rank)
    alpha = alphas.get(get_pattern_key(alphas.keys(), layer), config.get("lora_alpha", r)) if alphas \
        else config.get("lora_alpha", r)
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
