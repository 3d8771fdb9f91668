"""Prometheus metrics of one worker process: jobs by outcome, durations, seconds per step, load time, memory,
adapters (cache hits, loads and their time)."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

JOBS = Counter("inpaint_jobs_total", "Jobs ended, by outcome (success or the error code)", ["outcome"])
JOB_SECONDS = Histogram("inpaint_job_duration_seconds", "Time from a job's start to its end",
                        buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800))
QUEUE_WAIT_SECONDS = Histogram("inpaint_queue_wait_seconds", "Time from submit to a worker starting the job",
                               buckets=(0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600))
STEP_SECONDS = Histogram("inpaint_step_seconds", "Seconds per denoising step (a job's average)",
                         buckets=(0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5))
MODEL_LOAD_SECONDS = Gauge("inpaint_model_load_seconds", "Time the worker took to load its pipeline")
ADAPTER_USES = Counter("inpaint_adapter_uses_total", "Adapters jobs applied, by where each came from: memory (a cache "
                       "hit), disk (read from the library's folder or the disk cache), s3 (downloaded first)",
                       ["source"])
ADAPTER_LOAD_SECONDS = Histogram("inpaint_adapter_load_seconds", "Time to load an adapter that was not in memory "
                                 "(download, read, check, move to the device)",
                                 buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300))
PEAK_MEMORY_BYTES = Gauge("inpaint_peak_accelerator_memory_bytes", "Peak accelerator memory of the last job")


def serve(port: int, address: str) -> None:
    start_http_server(port, addr=address)
    log.info("metrics on http://%s:%d/metrics", address, port)


def job_ended(outcome: str, seconds: float, timings: dict[str, float] | None = None, steps: int = 0) -> None:
    JOBS.labels(outcome).inc()
    JOB_SECONDS.observe(seconds)
    if timings and steps and timings.get("denoising"):
        STEP_SECONDS.observe(timings["denoising"] / steps)
    peak = peak_memory()
    if peak is not None:
        PEAK_MEMORY_BYTES.set(peak)


def peak_memory() -> int | None:
    """Peak CUDA memory since the last call (reset after reading); None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return peak


def queue_waited(seconds: float) -> None:
    QUEUE_WAIT_SECONDS.observe(seconds)
