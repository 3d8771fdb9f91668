"""`InpaintClient`: submit, follow, wait for and cancel jobs from a web backend (no torch needed).

    client = InpaintClient.from_env()            # INPAINT_BROKER_URL, INPAINT_RESULT_BACKEND
    job_id = client.submit({"prompt": "...", "image": "s3://in/cat.png", "mask_image": "s3://in/mask.png"})
    client.status(job_id).progress               # stage, step, total_steps, percent, eta_s
    client.wait(job_id, timeout=600).result      # InpaintResult with presigned URLs
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from celery import Celery
from pydantic import BaseModel

from .app import TASK_NAME, cancel_key, make_app, submitted_key
from .errors import InvalidRequest
from .schema import JOB_ID_PATTERN, InpaintRequest, InpaintResult, Progress, parse_request
from .settings import Settings

TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}


class JobStatus(BaseModel):
    job_id: str
    state: str  # PENDING (queued, or an id never submitted), STARTED, PROGRESS, SUCCESS, FAILURE
    progress: Progress | None = None
    result: InpaintResult | None = None
    error: dict[str, Any] | None = None  # code, message, and field or plugin when known

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


class InpaintClient:
    def __init__(self, app: Celery, result_expires_s: int = 86400):
        self.app = app
        self.result_expires_s = result_expires_s

    @classmethod
    def from_env(cls) -> InpaintClient:
        settings = Settings()
        return cls(make_app(settings), settings.result_expires_s)

    @property
    def redis(self) -> Any:
        return self.app.backend.client

    def submit(self, request: dict | InpaintRequest, job_id: str | None = None) -> str:
        """Validate and enqueue; the same `job_id` twice enqueues once and returns the same job."""
        parsed = parse_request(request)
        payload = request if isinstance(request, dict) else request.model_dump(mode="json", exclude_unset=True)
        job_id = job_id or parsed.job_id or uuid.uuid4().hex
        if not re.match(JOB_ID_PATTERN, job_id):
            raise InvalidRequest("job_id", f"{job_id!r:.80} must match {JOB_ID_PATTERN}")
        if self.redis.set(submitted_key(job_id), "1", nx=True, ex=self.result_expires_s):
            try:
                self.app.send_task(TASK_NAME, kwargs={"request": payload}, task_id=job_id,
                                   headers={"inpaint_submitted_at": time.time()})  # for the queue-wait metric
            except Exception:
                self.redis.delete(submitted_key(job_id))  # not enqueued: let a retry with this id through
                raise
        return job_id

    def status(self, job_id: str) -> JobStatus:
        async_result = self.app.AsyncResult(job_id)
        state, info = async_result.state, async_result.info
        status = JobStatus(job_id=job_id, state=state)
        if state == "PROGRESS" and isinstance(info, dict):
            status.progress = Progress.model_validate(info)
        elif state == "SUCCESS":
            status.result = InpaintResult.model_validate(info)
        elif state == "FAILURE":
            status.error = error_of(info)
        elif state == "REVOKED":
            status.error = {"code": "cancelled", "message": "revoked before it started"}
        return status

    def wait(self, job_id: str, timeout: float = 600.0) -> JobStatus:
        """Block until the job ends (Redis tells us at once); raise TimeoutError after `timeout` seconds."""
        from celery.exceptions import TimeoutError as CeleryTimeout

        try:
            self.app.AsyncResult(job_id).get(timeout=timeout, propagate=False, disable_sync_subtasks=False)
        except CeleryTimeout:
            raise TimeoutError(f"job {job_id} is still {self.status(job_id).state} after {timeout:g} s") from None
        return self.status(job_id)

    def cancel(self, job_id: str) -> None:
        """A queued job will not start; a running one stops within one denoising step and writes nothing."""
        self.redis.set(cancel_key(job_id), "1", ex=self.result_expires_s)


def error_of(info: Any) -> dict[str, Any]:
    """The error dict of a failed job, from our `JobFailed` or any other exception Celery stored."""
    to_dict = getattr(info, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    return {"code": "internal", "message": f"{type(info).__name__}: {info}"}
