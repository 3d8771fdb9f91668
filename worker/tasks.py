"""The `inpaint` Celery task: a few lines around `job.run`, with S3 in and out and progress in the task state."""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from celery.exceptions import Ignore, Reject
from celery.signals import task_postrun, task_received, worker_init
from celery.worker.request import Request

from . import job, logs, metrics
from .app import app
from .errors import Cancelled, InvalidRequest, JobError, JobFailed, connection_error
from .lease import JobLease, copy_received
from .model import LoadedModel, load_model, wants_warm_up, warm_up
from .plugins import Plugins
from .protocol import (
    LEASE_S,
    SUBMITTED_AT,
    TASK_NAME,
    TERMINAL,
    cancel_key,
    kwargs_summary,
    store_progress,
    waiting_copy_key,
)
from .queues import mark_taken, record_finished
from .redaction import redacted, redacted_text
from .requeue import Sweeper
from .schema import Progress, parse_request
from .settings import get_settings
from .storage import S3Sink, StorageFetcher, s3_client, s3_presigner

log = logging.getLogger(__name__)
_lock = threading.Lock()
_runtime: Runtime | None = None
_leases: dict[str, JobLease] = {}  # by job id: the jobs this process runs now


@dataclass
class Runtime:
    """What a worker process loads once and every job reuses."""

    model: LoadedModel
    plugins: Plugins
    s3: Any  # one boto3 client for every job's inputs and outputs (thread-safe; making one takes ms)
    presigner: Any  # signs the results' URLs for the endpoint browsers reach
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
            _runtime = Runtime(model, plugins, s3, s3_presigner(settings, s3), StorageFetcher(settings, s3))
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
            metrics.serve(settings.metrics_port, settings.metrics_address, app, consumed_queues)
        runtime()
        Sweeper(app).start()  # dead workers' jobs back in the queue within seconds
    except Exception as error:
        log.critical("worker cannot start and exits: %s: %s", type(error).__name__, error,
                     exc_info=not isinstance(error, RuntimeError))
        raise SystemExit(1) from None


# what Flower shows as a job's result once it ended (its result field is a repr cut at 1 KB): set by the task, sent
# with its task-succeeded or task-failed event
_outcome_lines: dict[str, str] = {}


class RedactedRequest(Request):
    """A job as `inspect active/reserved` (Flower's worker page) shows it: the request redacted, whoever sent it;
    as its events carry it to Flower (and its database): the outcome in a line, URLs without their signatures; and
    a copy's events not at all (worker/lease.py)."""

    inpaint_copy = False  # set when the message was received: a copy of a job that ended or runs elsewhere

    def info(self, safe: bool = False) -> dict:
        return {**super().info(safe=True), "args": "()", "kwargs": kwargs_summary(self._kwargs.get("request"))}

    def send_event(self, type: str, **fields: Any) -> None:
        if type == "task-started" and self.inpaint_copy:  # it waits or is dropped; if it runs, its outcome is sent
            return
        if type in ("task-succeeded", "task-failed"):
            shown = _outcome_lines.pop(self.id, None)
            fields["result"] = redacted_text(shown if shown is not None else str(fields.get("result") or "")) or None
        elif type == "task-revoked":  # not the last progress line (a task's result field shows it while it runs)
            fields.setdefault("result", None)
        super().send_event(type, **fields)


@task_received.connect
def on_received(request: Any, **_: Any) -> None:
    """Before Celery tells of a message (its task-received event): the request as events may show it, redacted,
    whoever sent it (a protocol 1 message's repr is the whole request, signed URLs and all; a client such as
    celery-node sets no kwargsrepr); and whether it is a copy of a job that ended or runs on another worker, whose
    events would change what Flower shows of the job."""
    if request.name != TASK_NAME:
        return
    request._argsrepr, request._kwargsrepr = "()", kwargs_summary(request.kwargs.get("request"))
    if copy_received(request.app, request.id):
        request.inpaint_copy = True


@app.task(name=TASK_NAME, bind=True, throws=(JobFailed,), Request=RedactedRequest)  # JobFailed: logged, no traceback
def inpaint(self: Any, *args: Any, request: Any = None, **kwargs: Any) -> dict:
    """One job: `request` is its only argument. Anything else a sender may put in a message (positional
    arguments, the request's fields flat as keyword arguments, no request) fails as `invalid_request`."""
    token = logs.current_job.set(self.request.id)
    try:
        if args or kwargs or request is None:
            raise JobFailed.from_error(misaddressed(args, kwargs))
        take_when_redis_answers(self)
        result = run_counted(self, request)
        _outcome_lines[self.request.id] = result_line(result)
        return result
    except JobFailed as failed:
        _outcome_lines[self.request.id] = f"failed: {failed.code}" + (f" ({failed.field})" if failed.field else "") + \
            f": {failed.message[:600]}"
        raise
    finally:
        logs.current_job.reset(token)


def result_line(result: dict) -> str:
    """A finished job in a line, as Flower shows it: `2 images 768x576 png in 12.3 s (30 steps, true CFG): s3://...`."""
    parameters, images = result["parameters"], result["images"]
    where = ", ".join(image["location"] for image in images[:3]) + (f" and {len(images) - 3} more" if len(images) > 3
                                                                     else "")
    cfg = ", true CFG" if parameters["true_cfg"] else ""
    return (f"{len(images)} image{'s' * (len(images) != 1)} {parameters['width']}x{parameters['height']} "
            f"{parameters['output_type']} in {result['timings']['total']:.1f} s ({parameters['steps_run']} "
            f"steps{cfg}): {where}")


def misaddressed(args: tuple, kwargs: dict) -> InvalidRequest:
    """What a message that does not hold one `request` keyword argument is told (a plain send_task's mistake)."""
    got = ", ".join([f"{len(args)} positional argument{'s' * (len(args) != 1)}"] * bool(args)
                    + [f"keyword arguments {sorted(kwargs)[:8]}"] * bool(kwargs)) or "no arguments"
    return InvalidRequest("request", f"the task takes one keyword argument, request (the request as a JSON object): "
                          f"send_task('{TASK_NAME}', kwargs={{'request': {{...}}}}); got {got}")


REDIS_AWAY_S = 60  # how long a job being taken waits for Redis (a Sentinel failover: its down-after, then a vote)


def take_when_redis_answers(task: Any) -> None:
    """`take_the_job`, tried again while Redis cannot be reached (a failover, a restart): a job is not failed for
    it. After REDIS_AWAY_S its message goes back to its queue, or, when the broker is away too, the sweep puts it
    back once Redis is there again (worker/requeue.py)."""
    wait, give_up = 0.5, time.monotonic() + REDIS_AWAY_S
    while True:
        try:
            return take_the_job(task)
        except Exception as error:
            cause = connection_error(error)
            if cause is None:
                raise
            release_the_job(task.request.id)  # a lease taken before Redis went away
            reason = redacted_text(f"{type(cause).__name__}: {cause}")
            if time.monotonic() + wait > give_up:
                log.error("Redis could not be reached while taking the job for %d s (%s): it goes back to its "
                          "queue", REDIS_AWAY_S, reason)
                raise Reject("Redis away while taking the job", requeue=True) from None
            log.warning("Redis could not be reached while taking the job (%s): trying again in %.1f s", reason, wait)
            time.sleep(wait)
            wait = min(wait * 2, 5.0)


def take_the_job(task: Any) -> None:
    """Hold the job's lease, waiting while another worker runs the job, then mark it STARTED.

    Raises `Ignore` (the message is acked, nothing is stored) when the job has ended already: delivered
    again after its outcome was stored (a lost ack, or a copy that waited for the one running). The
    stored outcome stands, and nothing is run or counted.
    """
    job_id, hostname = task.request.id, task.request.hostname
    mark_taken(task.app.backend.client, job_queue(task), job_id)  # no longer waiting in its queue
    lease = JobLease(task.app.backend.client, job_id, hostname)
    give_up = time.monotonic() + get_settings().visibility_timeout_s  # as Redis itself would redeliver it
    waited = False
    while not lease.acquire():
        if task.AsyncResult(job_id).state in TERMINAL:
            break
        if not waited:
            log.warning("job is running on %s (its message came back, as after a lost broker connection): "
                        "waiting for it to end instead of running it twice", lease.holder())
            waited = True
        if time.monotonic() > give_up:
            log.error("job has been running elsewhere for longer than INPAINT_VISIBILITY_TIMEOUT_S: running it here")
            lease.take_over()
            break
        task.app.backend.client.set(waiting_copy_key(job_id), hostname, px=LEASE_S * 1000)  # not a dead one's job
        time.sleep(1.0)
    _leases[job_id] = lease  # held now: released after the outcome is stored, or if Redis goes away before
    if waited:
        task.app.backend.client.delete(waiting_copy_key(job_id))
    state = task.AsyncResult(job_id).state  # read once held: a holder stores its outcome before it lets go
    if state in TERMINAL:
        release_the_job(job_id)
        log.info("job already ended (%s): this copy is dropped, nothing is run or counted", state)
        raise Ignore()
    task.backend.store_result(job_id, {"pid": os.getpid(), "hostname": hostname}, "STARTED", request=task.request)


@task_postrun.connect
def release_the_job(task_id: str, **_: Any) -> None:
    """After the outcome is stored (Celery stores it before `task_postrun`), another copy may take the job."""
    lease = _leases.pop(task_id, None)
    if lease is not None:
        lease.release()


def run_counted(task: Any, request: dict) -> dict:
    job_id, started, waited = task.request.id, time.time(), queue_wait(task.request)
    try:
        log.info("job started")
        if waited:
            metrics.queue_waited(waited["queue_wait_s"])
        result = run_job(task, job_id, request, waited)
    except JobFailed as failed:
        metrics.job_ended(failed.code, time.time() - started)
        raise
    except (Ignore, Reject):  # it gave way to another worker (worker/requeue.py): not this worker's outcome
        raise
    except Exception:
        metrics.job_ended("internal", time.time() - started)
        raise
    finally:
        queue_paced(task)
    metrics.job_ended("success", time.time() - started, result["timings"],
                      result["parameters"]["steps_run"] * result["parameters"]["images"])
    log.info("job succeeded in %.2f s", time.time() - started)
    return result


def consumed_queues() -> list[str]:
    """The queues this worker takes jobs from (`--queues`; the default queue before the worker subscribed)."""
    return list(app.amqp.queues.consume_from or {}) or [get_settings().queue]


def job_queue(task: Any) -> str:
    """The queue the running job's message came from."""
    return (task.request.delivery_info or {}).get("routing_key") or get_settings().queue


def queue_paced(task: Any) -> None:
    """Record that a job of its queue ended: a waiting job's estimated start reads the queue's pace from these."""
    try:
        record_finished(task.app.backend.client, job_queue(task), task.request.id)
    except Exception as error:  # an estimate is not worth failing a job over
        log.warning("could not record the queue's pace: %s", error)


def run_job(task: Any, job_id: str, request: dict, waited: dict[str, float]) -> dict:
    settings, redis, lease = get_settings(), app.backend.client, _leases.get(job_id)
    lost: list[bool] = []  # read once it is: a later read could fail (Redis away) and say otherwise

    def taken() -> bool:
        if not lost and lease is not None and lease.taken():
            lost.append(True)
        return bool(lost)

    try:
        if cancel_requested(redis, job_id):  # Redis away for a moment: it is asked again at every step
            raise Cancelled("cancelled before it started")
        parsed = parse_request(request)
        if parsed.job_id is not None and parsed.job_id != job_id:
            raise InvalidRequest("job_id", f"{parsed.job_id!r} differs from the task's id; a job's id is its task's: "
                                 "send_task(..., task_id=job_id), or leave job_id out")
        bucket = parsed.output.bucket or settings.output_bucket
        if bucket != settings.output_bucket:
            raise InvalidRequest("output.bucket", f"this worker writes only to {settings.output_bucket!r}")
        rt = runtime()
        reporter = TaskReporter(task, job_id)
        try:
            result = job.run(parsed, model=rt.model, plugins=rt.plugins, fetcher=rt.fetcher,
                             sink=S3Sink(settings, job_id, bucket, parsed.output.prefix or settings.output_prefix,
                                         rt.s3, rt.presigner),
                             settings=settings, reporter=reporter,
                             cancel_requested=lambda: cancel_requested(redis, job_id) or taken(),
                             job_id=job_id, worker={"node": task.request.hostname, **waited})
        finally:
            reporter.close()
    except JobError as error:
        if taken():
            raise give_way() from None
        log.warning("job failed: %s", error)
        raise JobFailed.from_error(error) from None
    if taken():  # it ran on while frozen: the job's outcome is the run that holds the lease
        raise give_way()
    return result.model_dump(mode="json")


def give_way() -> Reject:
    """This worker lost the job's lease (frozen, or cut off from Redis, for LEASE_S): this run ends without an
    outcome, and its message is rejected back to the queue. If the sweep put the job back already (under a new
    delivery tag, worker/requeue.py), the reject names nothing and another worker's run stands."""
    log.error("this worker lost the job's lease (frozen, or cut off from Redis, for %d s): this run ends without "
              "an outcome; the job goes back to its queue, or was put back and runs elsewhere", LEASE_S)
    return Reject("lost the job's lease", requeue=True)


def queue_wait(request: Any) -> dict[str, float]:
    """Seconds from submit to now, when the job came through InpaintClient.submit (which stamps it)."""
    submitted = getattr(request, SUBMITTED_AT, None)  # a header: any sender may set it, to anything
    if isinstance(submitted, bool) or not isinstance(submitted, int | float) or not submitted:
        return {}
    return {"queue_wait_s": round(max(0.0, time.time() - submitted), 3)}


def cancel_requested(redis: Any, job_id: str) -> bool:
    """Whether a cancel was asked for; Redis being away for a moment is not a reason to stop a job."""
    try:
        return bool(redis.exists(cancel_key(job_id)))
    except Exception as error:
        log.warning("could not check for a cancel: %s", error)
        return False


class TaskReporter:
    """Progress into the task state (for clients) and a task event (for Flower), sent by a thread of its own.

    The job never waits on Redis: each report replaces the one not yet sent, and one that could not be
    sent is tried again a second later unless a newer one came, until `close`. A report never replaces
    the job's outcome, however late it reaches Redis.
    """

    RETRY_S = 1.0

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
            if self._send(progress):
                continue
            with self._wake:
                if self._closed:  # the outcome follows: no use for progress now
                    return
                if self._pending is None:
                    self._pending = progress
                self._wake.wait(self.RETRY_S)

    def _send(self, progress: Progress) -> bool:
        meta = progress.model_dump(exclude_none=True)
        try:  # from this thread, Celery's task.request is not the job's: name the job explicitly
            store_progress(self.app.backend, self.job_id, meta)
            with self.app.events.default_dispatcher(hostname=self.hostname) as events:
                # `result` too: the one field of a task that Flower's pages and API show for a running task
                shown = {**meta, "preview": redacted(progress.preview)} if progress.preview else meta  # Flower
                events.send("task-progress", uuid=self.job_id, result=progress_line(progress), **shown)  # keeps it
        except Exception as error:  # progress is best effort: Redis away must not fail the job
            log.warning("could not report progress: %s", error)
            return False
        return True


def progress_line(progress: Progress) -> str:
    """A job's progress in a few words, as Flower shows it: `denoising: step 3 of 40, about 12 s left`."""
    left = f", about {progress.eta_s:.0f} s left" if progress.eta_s is not None else ""
    return f"{progress.stage}: step {progress.step} of {progress.total_steps}{left}"
