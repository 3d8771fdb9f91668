"""Prometheus metrics of one worker process: jobs by outcome, durations, seconds per step, load time, memory,
adapters (cache hits, loads and their time); and of the queues (depth by priority, the oldest wait), from any
worker or from `inpaint-worker metrics`, which needs no GPU."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from . import queues

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
                       "hit), library (read from the library's folder), disk (the disk cache of S3 adapters), s3 "
                       "(downloaded first)", ["source"])
ADAPTER_LOAD_SECONDS = Histogram("inpaint_adapter_load_seconds", "Time to load an adapter that was not in memory "
                                 "(download, read, check, move to the device)",
                                 buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300))
PEAK_MEMORY_BYTES = Gauge("inpaint_peak_accelerator_memory_bytes", "Peak accelerator memory of the last job")


def serve(port: int, address: str, app: Any = None, queue_names: Callable[[], Iterable[str]] | None = None) -> None:
    """Serve the metrics; with `app`, also the depth of the queues `queue_names` gives, read at each scrape."""
    if app is not None and queue_names is not None:
        REGISTRY.register(QueueCollector(app, queue_names))
    start_http_server(port, addr=address)
    log.info("metrics on http://%s:%d/metrics", address, port)


class QueueCollector:
    """The queues as an autoscaler reads them: jobs waiting by queue and priority step, and how long the longest
    waiting one has waited. Every worker and the exporter report the same numbers: aggregate with max, not sum."""

    def __init__(self, app: Any, queue_names: Callable[[], Iterable[str]]):
        self.app, self.queue_names = app, queue_names

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("inpaint_queue_depth", "Jobs waiting, by queue and priority step (0: priorities "
                                  "0-2, the most urgent; 3: 3-5; 6: 6-8; 9: 9)", labels=["queue", "priority"])
        oldest = GaugeMetricFamily("inpaint_queue_oldest_wait_seconds", "How long the longest-waiting job of the "
                                   "queue has waited (jobs sent by InpaintClient.submit)", labels=["queue"])
        try:
            with queues.broker_redis(self.app) as client:
                for queue in sorted(set(self.queue_names())):
                    for step, waiting in queues.depth(client, queue).items():
                        depth.add_metric([queue, str(step)], waiting)
                    waited = queues.oldest_wait_s(client, queue)
                    if waited is not None:
                        oldest.add_metric([queue], waited)
        except Exception as error:  # Redis away: a scrape without the queues, not a failed scrape
            log.warning("could not read the queues for metrics: %s", error)
        yield depth
        yield oldest


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
