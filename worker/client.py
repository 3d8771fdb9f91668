"""`InpaintClient`: submit, follow, wait for and cancel jobs from a web backend (no torch needed).

    client = InpaintClient.from_env()            # INPAINT_BROKER_URL, INPAINT_RESULT_BACKEND
    image = client.upload("cat.png")             # s3://<first of INPAINT_INPUT_BUCKETS>/uploads/<sha256>.png
    job_id = client.submit({"prompt": "...", "image": image, "mask_image": data_url("mask.png")})
    client.status(job_id).progress               # stage, step, total_steps, percent, eta_s
    client.wait(job_id, timeout=600).result      # InpaintResult with presigned URLs

Every method raises `RedisUnavailable` (a `ConnectionError`) within seconds when Redis cannot be
reached: the message names the Redis URL (without its password). `wait` raises `TimeoutError`
when the job is still going after `timeout` seconds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import mimetypes
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from celery import Celery
from pydantic import BaseModel

from .app import make_app
from .errors import InvalidRequest, causes, connection_error
from .protocol import (
    CLAIM_HOLD_S,
    CLAIM_SCRIPT,
    CLAIMED,
    SENDING,
    SUBMITTED_AT,
    TASK_NAME,
    TERMINAL,
    cancel_key,
    kwargs_summary,
    submitted_key,
)
from .queues import QUEUE_PATTERN, broker_redis, mark_taken, mark_waiting, place
from .redaction import redacted_reference
from .schema import JOB_ID_PATTERN, InpaintRequest, InpaintResult, Progress, QueuePlace, parse_request
from .settings import Settings

log = logging.getLogger(__name__)

SEND_TRIES = 3
UPLOAD_PREFIX = "uploads"
Source = str | os.PathLike | bytes  # a local file's path, or its bytes


class RedisUnavailable(ConnectionError):
    """Redis (the broker or the result backend) could not be reached; `url` is shown without its password."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"cannot reach Redis at {url}: {reason}")
        self.url, self.reason = url, reason


class JobStatus(BaseModel):
    """A job as `status` and `wait` see it; which of `progress`, `result` and `error` is set follows `state`.

    - `job_id`: the job's id (its task id, and the `{prefix}/{job_id}/` of its outputs).
    - `state`: `PENDING` (queued, or an id never submitted: see `submitted`), `STARTED`, `PROGRESS`
      (running), `SUCCESS`, `FAILURE`, or `REVOKED` (revoked before it started). `done` is True for
      the last three.
    - `submitted`: False when no `InpaintClient.submit` of this id happened in the last
      `result_expires_s`, so a `PENDING` id is unknown (or was sent with plain `send_task` and waits in
      the queue); always True once the job has a state of its own.
    - `queue` (while it waits: `PENDING`, or `PROGRESS` at stage `requeued` after its worker died):
      `QueuePlace`: `queue`, `position` (1: the next to start), `waiting` (jobs queued in all), `starts_in_s`
      (at the queue's recent pace; None until known).
    - `progress` (`PROGRESS` only): `Progress`: `stage`, `step` of `total_steps` (the steps that really run),
      `image` of `images`, `percent`, `elapsed_s`, `eta_s`, and `preview` when previews are on.
    - `result` (`SUCCESS` only): `InpaintResult`: `images` (`ImageOutput`: `index`, `location` (s3://), a
      presigned `url`, `content_type`, `width`, `height`, `seed`, `prompt_index`), `parameters`
      (`EffectiveParameters`: what really ran), `timings` (seconds by stage), `model` (a dict describing
      the loaded model: `name`, `device`, `dtype`, `load_s`, the speed options, ...) and `worker`
      (`WorkerInfo`: `node`, `device`, `versions`, `queue_wait_s`).
    - `error` (`FAILURE` and `REVOKED`): a dict with `code` (`invalid_request`, `input_not_found`, ...),
      `message`, and `field` or `plugin` when known.
    """

    job_id: str
    state: str
    submitted: bool = True
    queue: QueuePlace | None = None
    progress: Progress | None = None
    result: InpaintResult | None = None
    error: dict[str, Any] | None = None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


class InpaintClient:
    """Submit, follow, wait for and cancel jobs. Raises `RedisUnavailable` when Redis cannot be reached.

    `app` is used as it is: give it `make_app(settings, client=True)` (what `from_env` does), or a
    worker's app retries a lost Redis for minutes before a call returns.
    """

    def __init__(self, app: Celery, result_expires_s: int = 86400, claim_hold_s: float = CLAIM_HOLD_S,
                 settings: Settings | None = None):
        self.app = app
        self.result_expires_s = result_expires_s
        self.claim_hold_s = claim_hold_s
        self.settings = settings  # for `upload`: S3 endpoint and input buckets

    @classmethod
    def from_env(cls) -> InpaintClient:
        return cls.from_settings(Settings())

    @classmethod
    def from_settings(cls, settings: Settings) -> InpaintClient:
        return cls(make_app(settings, client=True), settings.result_expires_s, settings=settings)

    def upload(self, source: Source, key: str | None = None) -> str:
        """Put a local image (or tensor) into S3 and return the `s3://` reference for a request's field.

        `source` is a path or the file's bytes. The object goes into the first of `INPAINT_INPUT_BUCKETS`
        (the buckets workers read inputs from), at `uploads/<sha256 of the bytes>.<ext>` unless `key` is
        given: the same bytes twice are one object. S3 endpoint and credentials are the workers'
        (`INPAINT_S3_ENDPOINT_URL`, `AWS_*`). Raises `FileNotFoundError` for a missing file, `ValueError`
        when no input bucket is configured or the data is empty or over `INPAINT_INPUT_MAX_BYTES`, and
        `worker.errors.StorageError` when S3 refuses or cannot be reached.
        """
        if self.settings is None:
            raise ValueError("upload needs the S3 settings: build the client with InpaintClient.from_env() or "
                             "from_settings(settings), or pass settings=")
        if not self.settings.input_buckets:
            raise ValueError("no input bucket to upload to: set INPAINT_INPUT_BUCKETS (the buckets workers read "
                             "s3:// inputs from), e.g. INPAINT_INPUT_BUCKETS=uploads")
        data, name = read_source(source)
        if len(data) > self.settings.input_max_bytes:
            raise ValueError(f"{name or 'the data'} is {len(data)} bytes, over INPAINT_INPUT_MAX_BYTES "
                             f"({self.settings.input_max_bytes}): workers would refuse it")
        bucket, content_type = self.settings.input_buckets[0], content_type_of(data, name)
        key = key or f"{UPLOAD_PREFIX}/{hashlib.sha256(data).hexdigest()}{extension_of(name, content_type)}"
        put_object(self.settings, bucket, key, data, content_type)
        return f"s3://{bucket}/{key}"

    @property
    def redis(self) -> Any:
        return self.app.backend.client

    def submit(self, request: dict | InpaintRequest, job_id: str | None = None, queue: str | None = None) -> str:
        """Validate and enqueue; the same `job_id` twice enqueues once and returns the same job.

        Returns once the job is in the queue, sent by this call or an earlier one. While another
        call is sending the same id, this one waits for it; if that caller died before its send
        was confirmed, this one sends the job once the claim lapses (`claim_hold_s`, 30 s).
        `queue` is a named queue (`inpaint-worker launch --queues`); default: `INPAINT_QUEUE`. The request's
        `priority` orders it there: 0, the default, the most urgent.
        """
        queue = queue or self.app.conf.task_default_queue
        if not isinstance(queue, str) or not re.fullmatch(QUEUE_PATTERN, queue):
            raise InvalidRequest("queue", f"{queue!r:.80} must match {QUEUE_PATTERN}")
        parsed = parse_request(request)
        if job_id is not None and parsed.job_id is not None and job_id != parsed.job_id:
            raise InvalidRequest("job_id", f"the request's {parsed.job_id!r:.80} differs from submit's job_id "
                                 f"{job_id!r:.80}; give one of them")
        payload = request if isinstance(request, dict) else request.model_dump(mode="json", exclude_unset=True)
        try:  # what the queue carries; a Python caller can put anything in plugin options
            json.dumps(payload, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise InvalidRequest("request", f"must be plain JSON: {error}") from None
        job_id = job_id or parsed.job_id or uuid.uuid4().hex
        if not re.fullmatch(JOB_ID_PATTERN, job_id):
            raise InvalidRequest("job_id", f"{job_id!r:.80} must match {JOB_ID_PATTERN}")
        if self._claim(job_id):
            self._send(job_id, payload, queue, parsed.priority)
        return job_id

    def _claim(self, job_id: str) -> bool:
        """True when this call is to send the job; False when it is already sent."""
        deadline = time.monotonic() + self.claim_hold_s + 5  # a claim lapses within claim_hold_s
        while True:
            with self._reaching(self._backend_url):
                claim = self.redis.eval(CLAIM_SCRIPT, 2, submitted_key(job_id), cancel_key(job_id),
                                        math.ceil(self.claim_hold_s))
            if claim != SENDING:
                return claim == CLAIMED
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still being sent by another caller after "
                                   f"{self.claim_hold_s + 5:g} s")
            time.sleep(0.05)

    def _send(self, job_id: str, payload: dict, queue: str, priority: int) -> None:
        """Publish the job: once more after a dropped connection (a Redis restart leaves pooled ones dead), never
        after a timeout, which keeps a submit within one socket timeout and may come after Redis took the job."""
        try:  # before the send: a worker can take the job (and leave the index) before the send returns
            mark_waiting(self.redis, queue, priority, job_id)  # its place in the queue is read from this index
        except Exception as error:
            log.warning("job %s: its place in the queue will not be known: %s", job_id, error)
        for attempt in range(SEND_TRIES):
            try:
                with self._reaching(self._broker_url):
                    self.app.send_task(TASK_NAME, kwargs={"request": payload}, task_id=job_id, retry=False,
                                       queue=queue, priority=priority,
                                       headers={SUBMITTED_AT: time.time()},  # for the queue-wait metric
                                       # what task events (Flower) show instead of the request
                                       argsrepr="()", kwargsrepr=kwargs_summary(payload))
                break
            except RedisUnavailable as error:
                late = timed_out(error)
                if attempt + 1 < SEND_TRIES and not late:
                    time.sleep(0.2 * (attempt + 1))
                    continue
                self._unclaim(job_id, queue)
                if late:
                    raise RedisUnavailable(error.url, f"{error.reason}; if Redis took the job before it timed out, the "
                                           "job runs: submitting it again with the same job_id runs it once") from error
                raise
            except Exception:
                self._unclaim(job_id, queue)
                raise
        try:
            self.redis.set(submitted_key(job_id), f"sent:{queue}", ex=self.result_expires_s)  # where it waits
        except Exception as error:  # the job is queued; only a retry after claim_hold_s could send it twice
            log.warning("job %s is queued but its claim could not be confirmed: %s", job_id, error)

    def _unclaim(self, job_id: str, queue: str) -> None:
        """Not sent (or not known to be): let a retry with this id through at once."""
        try:
            self.redis.delete(submitted_key(job_id))
            mark_taken(self.redis, queue, job_id)
        except Exception:  # Redis is away for this too: the claim lapses after claim_hold_s
            pass

    def status(self, job_id: str) -> JobStatus:
        with self._reaching(self._backend_url):
            # one read: AsyncResult's .state then .info are two, and a job ending between them paired PROGRESS
            # with the result
            meta = self.app.backend.get_task_meta(job_id)
        state, info = meta["status"], meta.get("result")
        status = JobStatus(job_id=job_id, state=state)
        if state == "PROGRESS" and isinstance(info, dict):
            status.progress = Progress.model_validate(info)
        # waiting: queued, or back in its queue (at the front) after its worker died. Celery keeps no record of
        # queued ids: the claim of submit is the record, and says which queue
        if state == "PENDING" or (status.progress is not None and status.progress.stage == "requeued"):
            with self._reaching(self._backend_url):
                claim = self.redis.get(submitted_key(job_id))
            status.submitted = claim is not None or state != "PENDING"
            status.queue = self._place(job_id, claim)
        elif state == "SUCCESS":
            status.result = InpaintResult.model_validate(info)
        elif state == "FAILURE":
            status.error = error_of(info)
        elif state == "REVOKED":
            status.error = {"code": "cancelled", "message": "revoked before it started"}
        return status

    def _place(self, job_id: str, claim: bytes | str | None) -> QueuePlace | None:
        """Where a queued job waits: in the queue submit sent it to (the default queue for one sent otherwise)."""
        claim = claim.decode() if isinstance(claim, bytes) else claim
        queue = claim.partition(":")[2] if claim and claim.startswith("sent:") else self.app.conf.task_default_queue
        try:
            with broker_redis(self.app) as broker:
                return place(broker, self.redis, queue, job_id)
        except Exception as error:
            if connection_error(error) is None:
                raise
        try:  # a pooled connection to a Redis that restarted since: a fresh one, once
            with broker_redis(self.app, fresh=True) as broker:
                return place(broker, self.redis, queue, job_id)
        except Exception as error:
            if connection_error(error) is None:
                raise
            log.warning("could not read job %s's place in its queue: %s", job_id, error)
            return None  # the status is known without it

    def wait(self, job_id: str, timeout: float = 600.0) -> JobStatus:
        """Block until the job ends (Redis tells us at once); raise TimeoutError after `timeout` seconds."""
        from celery.exceptions import TimeoutError as CeleryTimeout

        status = self.status(job_id)  # a finished job needs no subscription; Redis away fails here, at once
        if status.done:
            return status
        result = self.app.AsyncResult(job_id)
        try:
            with self._reaching(self._backend_url):
                result.get(timeout=timeout, propagate=False, disable_sync_subtasks=False)
        except CeleryTimeout:
            raise TimeoutError(f"job {job_id} is still {self.status(job_id).state} after {timeout:g} s") from None
        finally:
            try:  # unsubscribe now: AsyncResult.__del__ would, later, when Redis may be gone (a traceback on stderr)
                self.app.backend.remove_pending_result(result)
            except Exception:
                pass
        return self.status(job_id)

    def cancel(self, job_id: str) -> Literal["requested", "ended", "unknown"]:
        """A queued job will not start; a running one stops within one denoising step and writes no result.

        Returns `requested`; `ended` when the job had ended already (its outcome stands, nothing is done); or
        `unknown` for an id no `submit` sent (the cancel is kept all the same, for a job sent with plain
        `send_task`, until `submit` sends the id or `result_expires_s` passes).
        """
        status = self.status(job_id)
        if status.done:
            return "ended"
        with self._reaching(self._backend_url):
            self.redis.set(cancel_key(job_id), "1", ex=self.result_expires_s)
        return "requested" if status.submitted else "unknown"

    @property
    def _backend_url(self) -> str:
        return str(self.app.conf.result_backend or self.app.conf.broker_url)

    @property
    def _broker_url(self) -> str:
        return str(self.app.conf.broker_url)

    @contextmanager
    def _reaching(self, url: str) -> Iterator[None]:
        """Connection errors of redis-py, kombu and Celery's result consumer as one `RedisUnavailable`."""
        try:
            yield
        except RedisUnavailable:
            raise
        except Exception as error:
            cause = connection_error(error)
            if cause is None:
                raise
            shown = redacted_reference(url)
            reason = f"{type(cause).__name__}: {cause}".replace(url, shown)
            password = _password(url)
            if password and len(password) >= 4:  # Redis's messages name host and port; this is a safety net
                reason = reason.replace(password, "***")
            raise RedisUnavailable(shown, reason.strip()) from error


def timed_out(error: BaseException) -> bool:
    """Whether a connection error was a timeout: Redis may have done what it was asked, its reply lost."""
    import redis.exceptions

    return any(isinstance(cause, TimeoutError | redis.exceptions.TimeoutError) for cause in causes(error))


def _password(url: str) -> str | None:
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


def data_url(source: Source, content_type: str | None = None) -> str:
    """A local image (or tensor) inline, as a `data:` URL for a request's field: no S3 needed.

    `source` is a path or the file's bytes; the type is guessed from the name, or the image's own header
    (`content_type` overrides it). Workers take data: URLs of up to `INPAINT_DATA_URL_MAX_BYTES` (20 MB)
    decoded, and the whole request travels through Redis: for large or repeated inputs, `upload`.
    """
    data, name = read_source(source)
    kind = content_type or content_type_of(data, name)
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def read_source(source: Source) -> tuple[bytes, str | None]:
    """The bytes of a path or of bytes given as they are, and the file's name (None for bytes)."""
    if isinstance(source, bytes | bytearray | memoryview):
        data, name = bytes(source), None
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            problem = "is a directory, not a file" if path.is_dir() else "no such file"
            raise FileNotFoundError(f"{path}: {problem}")
        data, name = path.read_bytes(), path.name
    else:
        raise TypeError(f"expected a path or bytes, not {type(source).__name__}")
    if not data:
        raise ValueError(f"{name or 'the data'} is empty")
    return data, name


def content_type_of(data: bytes, name: str | None) -> str:
    """The MIME type from the file name, else from the image's header; octet-stream for anything else."""
    guessed = mimetypes.guess_type(name)[0] if name else None
    if guessed:
        return guessed
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            return Image.MIME.get(image.format or "", "application/octet-stream")
    except (UnidentifiedImageError, OSError):
        return "application/octet-stream"


def extension_of(name: str | None, content_type: str) -> str:
    suffix = Path(name).suffix.lower() if name else ""
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,12}", suffix) else (mimetypes.guess_extension(content_type) or "")


def put_object(settings: Settings, bucket: str, key: str, data: bytes, content_type: str) -> None:
    """One object into S3, with the workers' client and retries; S3's refusals as `StorageError`."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    from .errors import StorageError
    from .retries import with_retries
    from .storage import s3_client, s3_trouble

    where = f"s3://{bucket}/{key}" + (f" at {settings.s3_endpoint_url}" if settings.s3_endpoint_url else "")
    try:
        with_retries(settings, f"upload to {where}",
                     lambda: s3_client(settings).put_object(Bucket=bucket, Key=key, Body=data,
                                                            ContentType=content_type),
                     s3_trouble)
    except NoCredentialsError:  # no try would find them
        raise StorageError(f"upload to {where}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                           "(or another of boto3's credential sources)") from None
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "?")
        raise StorageError(f"upload to {where} refused: {code}: {error.response.get('Error', {}).get('Message', '')}"
                           ) from None
    except BotoCoreError as error:  # a bad endpoint
        raise StorageError(f"upload to {where} failed: {error}") from None


def error_of(info: Any) -> dict[str, Any]:
    """The error dict of a failed job, from our `JobFailed` or any other exception Celery stored."""
    to_dict = getattr(info, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    return {"code": "internal", "message": f"{type(info).__name__}: {info}"}
