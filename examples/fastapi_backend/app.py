"""A reference web backend over `InpaintClient`: submit, poll, stream progress (SSE) and cancel inpainting jobs, hand
out presigned uploads, and serve a page for people at `/` (static/: plain HTML and JavaScript, no build step).

    INPAINT_BROKER_URL=redis://localhost:6379/0 uvicorn examples.fastapi_backend.app:app

It imports only the light client: no torch, no model, so it runs in any web container. The page's own settings:
`CORS_ALLOW_ORIGINS` (comma-separated origins that may call this API from another site; none by default). Uploads are
signed for `INPAINT_S3_PUBLIC_ENDPOINT_URL`, the S3 endpoint as browsers reach it, as the workers sign results.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from worker.client import InpaintClient, JobStatus, RedisUnavailable
from worker.errors import JobError
from worker.schema import JOB_ID_PATTERN, UPPER_BOUNDS, InpaintRequest
from worker.settings import Settings
from worker.storage import s3_presigner

POLL_S = 0.25
# proxies and load balancers drop connections that stay silent for a minute or so; a comment line keeps it open
KEEPALIVE_S = 15.0
STATIC = Path(__file__).resolve().parent / "static"
# what the worker decodes (PIL: PNG, JPEG, WebP); the page uploads photos as they are and masks as PNG
UPLOAD_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}
UPLOAD_PREFIX = "uploads/page"
UPLOAD_EXPIRES_S = 600

router = APIRouter()


def create_app(client: InpaintClient | None = None, settings: Settings | None = None,
               cors_origins: list[str] | None = None) -> FastAPI:
    """The app; without `client` one is made from the `INPAINT_*` environment on the first request, and without
    `settings` (S3 endpoint, input bucket, the workers' caps) the client's, else the environment's, when first needed.
    `cors_origins` (default: `CORS_ALLOW_ORIGINS`, comma-separated) may call the API from pages of other sites."""
    app = FastAPI(title="Inpainting jobs", description="Qwen-Image inpainting jobs over InpaintClient: submit, "
                  "follow, cancel, and presigned uploads of their inputs. The page for people is at `/`.")
    app.state.client = client
    app.state.settings = settings
    # requests run in a thread pool, so two first requests could otherwise build two clients
    app.state.client_lock = threading.Lock()
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    origins = cors_origins if cors_origins is not None else _names(os.environ.get("CORS_ALLOW_ORIGINS", ""))
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Content-Type", "Idempotency-Key"], expose_headers=["Location"])
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


def service_settings(request: Request) -> Settings:
    state = request.app.state
    if state.settings is None:
        client = state.client or inpaint_client(request)
        state.settings = client.settings or Settings()
    return state.settings


Client = Annotated[InpaintClient, Depends(inpaint_client)]
ServiceSettings = Annotated[Settings, Depends(service_settings)]


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


@router.get("/request-schema")
def request_schema(settings: ServiceSettings) -> dict[str, Any]:
    """`InpaintRequest`'s JSON schema with the service's own caps as `maximum` (the workers' `INPAINT_MAX_*` where
    lower than the schema's bounds), and `x-limits`: the pixel budget and what an upload may be. The page builds
    its form from it, so the page never holds a copy of a limit or a default."""
    schema = InpaintRequest.model_json_schema()
    caps = {name: most for name, (most, _) in UPPER_BOUNDS.items()}
    caps["num_inference_steps"] = min(caps["num_inference_steps"], settings.max_steps)
    caps["num_images_per_prompt"] = min(caps["num_images_per_prompt"], settings.max_images)
    caps["deadline_s"] = settings.max_deadline_s
    for name, most in caps.items():
        field = schema["properties"].get(name)
        for branch in (field or {}).get("anyOf", [field] if field else []):
            if branch.get("type") in ("integer", "number"):
                branch["maximum"] = most
    schema["x-limits"] = {"max_pixels": settings.max_pixels, "max_steps": settings.max_steps,
                          "max_images": settings.max_images, "max_deadline_s": settings.max_deadline_s,
                          "upload_max_bytes": settings.input_max_bytes, "upload_types": sorted(UPLOAD_TYPES)}
    return schema


class UploadRequest(BaseModel):
    content_type: str = Field(description="The file's type: image/png, image/jpeg or image/webp")
    size: int = Field(gt=0, description="The file's size in bytes, at most the workers' INPAINT_INPUT_MAX_BYTES")


class Upload(BaseModel):
    method: Literal["POST"] = "POST"
    url: str = Field(description="Where the browser POSTs the form: `fields`, then the file as `file`")
    fields: dict[str, str]
    reference: str = Field(description="The `s3://` reference to put in the request's `image` or `mask_image`")
    max_bytes: int
    expires_s: int


@router.post("/uploads", status_code=201, response_model=Upload, responses={422: {}, 503: {}})
def create_upload(body: UploadRequest, settings: ServiceSettings) -> Any:
    """A presigned POST into the workers' first input bucket: the browser sends the file straight to S3, and the job
    refers to it by `reference`. The policy holds the type and the size range, so S3 (AWS, MinIO) refuses any other
    file; both are checked here first, to answer next to the field at once."""
    if body.content_type not in UPLOAD_TYPES:
        return _error(422, "invalid_request", "content_type", f"{body.content_type!r:.80} is not an image the "
                      f"workers read: use one of {', '.join(sorted(UPLOAD_TYPES))}")
    if body.size > settings.input_max_bytes:
        return _error(422, "invalid_request", "size", f"the file is {body.size} bytes, over the "
                      f"{settings.input_max_bytes}-byte limit of an input")
    if not settings.input_buckets:
        return _error(503, "unavailable", None, "no input bucket to upload to: set INPAINT_INPUT_BUCKETS")
    bucket, key = settings.input_buckets[0], f"{UPLOAD_PREFIX}/{uuid.uuid4().hex}{UPLOAD_TYPES[body.content_type]}"
    post = s3_presigner(settings).generate_presigned_post(  # for the endpoint the browser reaches
        bucket, key, Fields={"Content-Type": body.content_type}, ExpiresIn=UPLOAD_EXPIRES_S,
        Conditions=[{"Content-Type": body.content_type}, ["content-length-range", 1, settings.input_max_bytes]])
    return Upload(url=post["url"], fields=post["fields"], reference=f"s3://{bucket}/{key}",
                  max_bytes=settings.input_max_bytes, expires_s=UPLOAD_EXPIRES_S)


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
    """Server-sent events: `state` (the status) while the job is queued or starting and whenever that changes,
    `progress` whenever the progress changes, then one `done` (or `timeout`, or `error` when Redis is lost during
    the stream), then close. An id nobody submitted is a 404; Redis away, a 503."""
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
    last_state: dict[str, Any] | None = None
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
        # queued or starting: the whole status, so a queue position appears wherever the client reports one
        state = _dump(status) if progress is None else None
        now = time.monotonic()
        if progress is not None and progress != last_progress:
            last_progress, last_sent = progress, now
            yield _event("progress", progress)
        elif state is not None and state != last_state:
            last_state, last_sent = state, now
            yield _event("state", state)
        elif now - last_sent >= KEEPALIVE_S:
            last_sent = now
            yield ": keepalive\n\n"
        if now >= deadline:
            # the job goes on; the caller may reconnect or poll GET /jobs/{id}
            yield _event("timeout", _dump(status))
            return
        await anyio.sleep(POLL_S)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


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
