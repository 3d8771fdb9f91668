"""A reference web backend over `InpaintClient`: submit, poll, stream progress (SSE) and cancel inpainting jobs.

    INPAINT_BROKER_URL=redis://localhost:6379/0 uvicorn examples.fastapi_backend.app:app

It imports only the light client: no torch, no model, so it runs in any web container.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from worker.client import InpaintClient, JobStatus, RedisUnavailable
from worker.errors import JobError
from worker.schema import JOB_ID_PATTERN

POLL_S = 0.25
# proxies and load balancers drop connections that stay silent for a minute or so; a comment line keeps it open
KEEPALIVE_S = 15.0

router = APIRouter()


def create_app(client: InpaintClient | None = None) -> FastAPI:
    """The app; without `client` one is made from the `INPAINT_*` environment on the first request."""
    app = FastAPI(title="Inpainting jobs", description="Qwen-Image inpainting jobs over InpaintClient")
    app.state.client = client
    # requests run in a thread pool, so two first requests could otherwise build two clients
    app.state.client_lock = threading.Lock()
    app.include_router(router)
    # FastAPI's own validation errors (a body that is not a JSON object) get the same shape as the worker's
    app.add_exception_handler(RequestValidationError, _validation_error)
    # Redis away: 503 at once (the client fails within seconds), not a 500 after minutes
    app.add_exception_handler(RedisUnavailable, _unavailable)
    return app


def inpaint_client(request: Request) -> InpaintClient:
    state = request.app.state
    if state.client is None:
        with state.client_lock:
            if state.client is None:
                state.client = InpaintClient.from_env()
    return state.client


Client = Annotated[InpaintClient, Depends(inpaint_client)]


@router.post("/jobs", status_code=202)
def submit_job(
    body: Annotated[dict[str, Any], Body(description="An InpaintRequest (see worker/schema.py)")],
    client: Client,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    # the key becomes the Celery task id and part of Redis keys and S3 paths, so it must be a valid job id
    if idempotency_key is not None and not re.fullmatch(JOB_ID_PATTERN, idempotency_key):
        return _error(422, "invalid_request", "Idempotency-Key",
                      f"must match {JOB_ID_PATTERN} (letters, digits, '_', '.', '-'; at most 128)")
    try:
        job_id = client.submit(body, job_id=idempotency_key)
    except JobError as error:
        return _error(422, error.code, error.field, error.message)
    status_url = f"/jobs/{job_id}"
    return JSONResponse({"job_id": job_id, "status_url": status_url}, status_code=202,
                        headers={"Location": status_url})


@router.get("/jobs/{job_id}")
def get_job(job_id: str, client: Client) -> Any:
    status = client.status(job_id)
    return _dump(status) if status.submitted else _not_found(job_id)


@router.delete("/jobs/{job_id}", status_code=202)
def cancel_job(job_id: str, client: Client) -> Any:
    # 202, not 200: the job ends FAILURE/cancelled only once the worker sees the flag (before the next step)
    outcome = client.cancel(job_id)
    if outcome == "unknown":
        return _not_found(job_id)
    if outcome == "ended":
        return _error(409, "already_ended", "job_id", f"job {job_id!r} has ended: nothing to cancel (GET it for its "
                      "outcome)")
    return {"job_id": job_id, "cancel_requested": True}


@router.get("/jobs/{job_id}/events")
async def job_events(
    job_id: str,
    client: Client,
    timeout: Annotated[float, Query(gt=0, le=86400, description="Close the stream after this many seconds")] = 3600.0,
) -> Response:
    """Server-sent events: `progress` whenever the progress changes, then one `done` (or `timeout`, or `error`
    when Redis is lost during the stream), then close. An id nobody submitted is a 404; Redis away, a 503."""
    if not (await run_in_threadpool(client.status, job_id)).submitted:
        return _not_found(job_id)
    return StreamingResponse(
        _events(client, job_id, timeout),
        media_type="text/event-stream",
        # nginx buffers responses by default, which would hold the events back until the stream ends
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(client: InpaintClient, job_id: str, timeout: float) -> AsyncIterator[str]:
    deadline = time.monotonic() + timeout
    last_progress: dict[str, Any] | None = None
    last_sent = time.monotonic()
    while True:
        try:
            # the client is blocking (redis-py); calling it here directly would stall every other request
            status = await run_in_threadpool(client.status, job_id)
        except RedisUnavailable as error:  # the response has started: an event, not a 503
            yield _event("error", {"code": "unavailable", "message": f"the job queue is unavailable: {error}"})
            return
        if status.done:
            yield _event("done", _dump(status))
            return
        progress = status.progress.model_dump(mode="json", exclude_none=True) if status.progress else None
        now = time.monotonic()
        if progress is not None and progress != last_progress:
            last_progress, last_sent = progress, now
            yield _event("progress", progress)
        elif now - last_sent >= KEEPALIVE_S:
            last_sent = now
            yield ": keepalive\n\n"
        if now >= deadline:
            # the job goes on; the caller may reconnect or poll GET /jobs/{id}
            yield _event("timeout", _dump(status))
            return
        await anyio.sleep(POLL_S)


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _dump(status: JobStatus) -> dict[str, Any]:
    return status.model_dump(mode="json", exclude_none=True)


def _error(status_code: int, code: str, field: str | None, message: str) -> JSONResponse:
    error = {"code": code, "message": message}
    if field:
        error["field"] = field
    return JSONResponse({"error": error}, status_code=status_code)


def _not_found(job_id: str) -> JSONResponse:
    # every job of this backend goes through client.submit, so an id without its claim was never submitted here
    # (or it expired with its result, after INPAINT_RESULT_EXPIRES_S)
    return _error(404, "not_found", "job_id", f"no job {job_id!r} was submitted (or it expired)")


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    return _error(503, "unavailable", None, f"the job queue is unavailable: {exc}")


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    first = exc.errors()[0] if isinstance(exc, RequestValidationError) and exc.errors() else {}
    if first.get("type") == "json_invalid":
        # pydantic locates a JSON syntax error by character offset, which is no field
        detail = first.get("ctx", {}).get("error", "")
        return _error(422, "invalid_request", "request", f"the body is not valid JSON: {detail}")
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    return _error(422, "invalid_request", ".".join(location) or "request",
                  first.get("msg", "the request body must be a JSON object"))

app = create_app()
