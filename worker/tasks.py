"""The `inpaint` Celery task: a few lines around `job.run`, with S3 in and out and progress in the task state."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from celery.signals import worker_init

from . import job, logs, metrics
from .app import TASK_NAME, app, cancel_key
from .errors import Cancelled, InvalidRequest, JobError, JobFailed
from .pipeline import LoadedModel, load_model, wants_warm_up, warm_up
from .plugins import Plugins
from .schema import Progress, parse_request
from .settings import get_settings
from .storage import S3Sink, StorageFetcher, s3_client

log = logging.getLogger(__name__)
_lock = threading.Lock()
_runtime: Runtime | None = None


@dataclass
class Runtime:
    """What a worker process loads once and every job reuses."""

    model: LoadedModel
    plugins: Plugins
    s3: Any  # one boto3 client for every job's inputs and outputs (thread-safe; making one takes ms)
    fetcher: StorageFetcher


def runtime() -> Runtime:
    global _runtime
    with _lock:
        if _runtime is None:
            settings = get_settings()
            if not settings.output_bucket:
                raise RuntimeError("INPAINT_OUTPUT_BUCKET is not set: the worker has nowhere to write results")
            plugins = Plugins(blocked=settings.plugins_blocked)
            model = load_model(settings, plugins)
            if wants_warm_up(settings, model):
                model.warmup_s = warm_up(model, settings.warmup_size)
                log.info("warmed up at %dx%d in %.1f s", settings.warmup_size, settings.warmup_size, model.warmup_s)
            log.info("worker ready: model %s on %s loaded in %.1f s; plugins %s", model.name, model.device,
                     model.load_s, plugins.names)
            s3 = s3_client(settings)
            _runtime = Runtime(model, plugins, s3, StorageFetcher(settings, s3))
            metrics.MODEL_LOAD_SECONDS.set(model.load_s)
        return _runtime


@worker_init.connect
def load_before_the_first_job(**_: Any) -> None:
    """Load the model before taking a job; a worker that cannot exits (1) instead of failing every job.

    Celery swallows what a signal handler raises, but not SystemExit. `launch` (or the container's restart
    policy) starts it again with backoff, and the health check never sees it answer.
    """
    settings = get_settings()
    logs.configure(settings.log_format, settings.log_level)  # worker_init comes before Celery's setup_logging
    try:
        if settings.metrics_port:
            metrics.serve(settings.metrics_port, settings.metrics_address)
        runtime()
    except Exception as error:
        log.critical("worker cannot start and exits: %s: %s", type(error).__name__, error,
                     exc_info=not isinstance(error, RuntimeError))
        raise SystemExit(1) from None


@app.task(name=TASK_NAME, bind=True, throws=(JobFailed,))  # expected failures: logged without a traceback
def inpaint(self: Any, request: dict) -> dict:
    job_id, started = self.request.id, time.time()
    token = logs.current_job.set(job_id)
    try:
        done = self.AsyncResult(job_id)
        if done.state == "SUCCESS":  # delivered again after it finished (its ack was lost): what it made
            log.info("job already succeeded; its result is returned again, nothing is run or counted")
            return done.result
        log.info("job started")
        waited = queue_wait(self.request).get("queue_wait_s")
        if waited is not None:
            metrics.queue_waited(waited)
        result = run_job(self, job_id, request)
    except JobFailed as failed:
        metrics.job_ended(failed.code, time.time() - started)
        raise
    except Exception:
        metrics.job_ended("internal", time.time() - started)
        raise
    else:
        metrics.job_ended("success", time.time() - started, result["timings"],
                          result["parameters"]["steps_run"] * result["parameters"]["images"])
        log.info("job succeeded in %.2f s", time.time() - started)
        return result
    finally:
        logs.current_job.reset(token)


def run_job(self: Any, job_id: str, request: dict) -> dict:
    settings, redis = get_settings(), app.backend.client
    try:
        if redis.exists(cancel_key(job_id)):
            raise Cancelled("cancelled before it started")
        parsed = parse_request(request)
        if parsed.job_id is not None and parsed.job_id != job_id:
            raise InvalidRequest("job_id", f"{parsed.job_id!r} differs from the task's id; a job's id is its task's: "
                                 "send_task(..., task_id=job_id), or leave job_id out")
        bucket = parsed.output.bucket or settings.output_bucket
        if bucket != settings.output_bucket:
            raise InvalidRequest("output.bucket", f"this worker writes only to {settings.output_bucket!r}")
        rt = runtime()
        reporter = TaskReporter(self, job_id)
        try:
            result = job.run(parsed, model=rt.model, plugins=rt.plugins, fetcher=rt.fetcher,
                             sink=S3Sink(settings, job_id, bucket, parsed.output.prefix or settings.output_prefix,
                                         rt.s3),
                             settings=settings, reporter=reporter,
                             cancel_requested=lambda: cancel_requested(redis, job_id),
                             job_id=job_id, worker={"node": self.request.hostname, **queue_wait(self.request)})
        finally:
            reporter.close()
    except JobError as error:
        log.warning("job failed: %s", error)
        raise JobFailed.from_error(error) from None
    return result.model_dump(mode="json")


def queue_wait(request: Any) -> dict[str, float]:
    """Seconds from submit to now, when the job came through InpaintClient.submit (which stamps it)."""
    submitted = getattr(request, "inpaint_submitted_at", None)
    return {"queue_wait_s": round(max(0.0, time.time() - submitted), 3)} if submitted else {}


def cancel_requested(redis: Any, job_id: str) -> bool:
    """Whether a cancel was asked for; Redis being away for a moment is not a reason to stop a job."""
    try:
        return bool(redis.exists(cancel_key(job_id)))
    except Exception as error:
        log.warning("could not check for a cancel: %s", error)
        return False


class TaskReporter:
    """Progress into the task state (for clients) and a task event (for Flower), sent by a thread of its own.

    The job never waits on Redis: each report replaces the one not yet sent, so a slow or
    restarting Redis gets the newest progress when it is back. `close` sends what is pending
    before the result is stored (and Celery never lets a late PROGRESS overwrite a SUCCESS).
    """

    def __init__(self, task: Any, job_id: str):
        self.app, self.job_id, self.hostname = task.app, job_id, task.request.hostname
        self._pending: Progress | None = None
        self._closed = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._send_loop,),
                                        name=f"progress-{job_id[:8]}", daemon=True)
        self._thread.start()

    def __call__(self, progress: Progress) -> None:
        with self._wake:
            self._pending = progress
            self._wake.notify()

    def close(self, timeout_s: float = 10.0) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout_s)

    def _send_loop(self) -> None:
        while True:
            with self._wake:
                while self._pending is None and not self._closed:
                    self._wake.wait()
                progress, self._pending = self._pending, None
            if progress is None:
                return
            self._send(progress)

    def _send(self, progress: Progress) -> None:
        meta = progress.model_dump(exclude_none=True)
        try:  # from this thread, Celery's task.request is not the job's: name the job explicitly
            self.app.backend.store_result(self.job_id, meta, "PROGRESS")
            with self.app.events.default_dispatcher(hostname=self.hostname) as events:
                events.send("task-progress", uuid=self.job_id, **meta)
        except Exception as error:  # progress is best effort: Redis away must not fail the job
            log.warning("could not report progress: %s", error)
