"""The FastAPI reference backend in examples/ against the real stack: redis-server, S3 over HTTP, a worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from examples.fastapi_backend.app import create_app
from tests.support import BROKER_PASSWORD, dead_client
from tests.support import job_request as request

pytestmark = pytest.mark.slow  # the example backend against the real stack

ROOT = Path(__file__).resolve().parents[1]

SLOW = {"testkit": {"step_s": 0.15}}


@pytest.fixture(scope="module")
def http(client):
    with TestClient(create_app(client)) as test_client:
        yield test_client


def submit(http, stack, **fields) -> str:
    response = http.post("/jobs", json=request(stack, **fields))
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def poll(http, job_id: str, until, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = http.get(f"/jobs/{job_id}")
        assert response.status_code == 200
        if until(body := response.json()):
            return body
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} never got there; last {body}")


def done(body: dict) -> bool:
    return body["state"] in ("SUCCESS", "FAILURE", "REVOKED")


def sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if fields:
            events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


def test_submit_then_poll_until_success_with_presigned_urls(stack, worker, http):
    response = http.post("/jobs", json=request(stack))
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert response.json() == {"job_id": job_id, "status_url": f"/jobs/{job_id}"}
    assert response.headers["location"] == f"/jobs/{job_id}"

    body = poll(http, job_id, done)
    assert body["state"] == "SUCCESS", body
    assert "error" not in body and "progress" not in body  # exclude_none
    image = body["result"]["images"][0]
    assert image["location"] == f"s3://outputs/jobs/{job_id}/0.png"
    assert urllib.request.urlopen(image["url"], timeout=10).read().startswith(b"\x89PNG")
    assert body["result"]["parameters"]["num_inference_steps"] == 4


def test_an_invalid_request_is_422_naming_the_field(stack, http):
    response = http.post("/jobs", json=request(stack, strength=2))
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["field"] == "strength", error
    assert "strength" in error["message"]

    response = http.post("/jobs", json=request(stack, colour="red"))
    assert response.status_code == 422 and response.json()["error"]["field"] == "colour"

    response = http.post("/jobs", content=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"

    response = http.post("/jobs", json=request(stack), headers={"Idempotency-Key": "not a job id"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "Idempotency-Key"


def test_the_same_idempotency_key_gives_the_same_job(stack, worker, http):
    key = f"order-{time.monotonic_ns()}"
    first = http.post("/jobs", json=request(stack), headers={"Idempotency-Key": key})
    second = http.post("/jobs", json=request(stack, seed=2), headers={"Idempotency-Key": key})
    assert first.status_code == second.status_code == 202
    assert first.json()["job_id"] == second.json()["job_id"] == key
    body = poll(http, key, done)
    assert body["state"] == "SUCCESS" and body["result"]["parameters"]["seeds"] == [1]


def test_delete_cancels_a_running_job(stack, worker, http):
    job_id = submit(http, stack, num_inference_steps=40, strength=1.0, plugins=SLOW)
    poll(http, job_id, lambda body: body.get("progress", {}).get("step", 0) >= 2 or done(body))

    response = http.delete(f"/jobs/{job_id}")
    assert response.status_code == 202
    assert response.json() == {"job_id": job_id, "cancel_requested": True}

    body = poll(http, job_id, done)
    assert body["state"] == "FAILURE" and body["error"]["code"] == "cancelled", body
    again = http.delete(f"/jobs/{job_id}")  # it has ended: nothing to cancel, the outcome stands
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_ended", again.text


def test_events_stream_progress_then_done(stack, worker, http):
    job_id = submit(http, stack, num_inference_steps=10, strength=1.0, plugins=SLOW)
    with http.stream("GET", f"/jobs/{job_id}/events", params={"timeout": 120}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse(response.read().decode())

    names = [name for name, _ in events]
    assert names[-1] == "done" and names.count("done") == 1 and "progress" in names, names
    # `state` (the status while queued or starting) only before the first progress
    assert set(names[:-1]) <= {"state", "progress"} and "state" not in names[names.index("progress"):], names
    assert all(data["job_id"] == job_id and data["state"] in ("PENDING", "STARTED")
               for name, data in events if name == "state"), events
    steps = [data["step"] for name, data in events if name == "progress" and data["stage"] == "denoising"]
    assert len(set(steps)) >= 2 and steps == sorted(steps), steps
    final = events[-1][1]
    assert final["state"] == "SUCCESS" and final["job_id"] == job_id
    assert final["result"]["images"][0]["url"].startswith("http")


def test_the_events_stream_is_bounded_by_its_timeout(http, stack):
    job_id = submit(http, stack, num_inference_steps=40, strength=1.0, plugins=SLOW)  # 6 s of steps
    started = time.monotonic()
    events = sse(http.get(f"/jobs/{job_id}/events", params={"timeout": 0.5}).text)
    assert time.monotonic() - started < 10
    assert events[-1][0] == "timeout" and events[-1][1]["state"] in ("PENDING", "STARTED", "PROGRESS"), events
    assert http.delete(f"/jobs/{job_id}").status_code == 202  # it stops within a step: the next test is not held up
    assert poll(http, job_id, done)["error"]["code"] == "cancelled"


def test_an_id_nobody_submitted_is_not_found_where_a_queued_one_is_pending(http, client, stack):
    unknown = f"never-{time.monotonic_ns()}"
    for method, path in (("GET", f"/jobs/{unknown}"), ("GET", f"/jobs/{unknown}/events"),
                         ("DELETE", f"/jobs/{unknown}")):
        response = http.request(method, path)
        assert response.status_code == 404, path
        assert response.json()["error"] == {"code": "not_found", "field": "job_id",
                                            "message": f"no job {unknown!r} was submitted (or it expired)"}
    assert client.status(unknown).submitted is False and client.status(unknown).state == "PENDING"


def test_importing_the_app_imports_no_torch_and_connects_to_nothing():
    code = ("import sys, examples.fastapi_backend.app as m; "
            "assert m.app.state.client is None; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    # a broker nobody listens on: importing must neither fail nor hang on it
    env = {**os.environ, "INPAINT_BROKER_URL": "redis://127.0.0.1:9/0"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_redis_down_is_a_503_within_seconds_not_a_hang():
    with TestClient(create_app(dead_client())) as down:
        for method, path in (("GET", "/jobs/order-1"), ("DELETE", "/jobs/order-1"), ("POST", "/jobs"),
                             ("GET", "/jobs/order-1/events")):  # a stream not yet started answers 503 too
            started = time.monotonic()
            response = down.request(method, path, json={"prompt": "x", "image": "s3://inputs/a.png",
                                                        "mask_image": "s3://inputs/b.png"})
            assert time.monotonic() - started < 15, (method, path)
            assert response.status_code == 503, (method, path, response.text)
            error = response.json()["error"]
            assert error["code"] == "unavailable" and "cannot reach Redis" in error["message"]
            assert BROKER_PASSWORD not in response.text


def test_an_idempotency_key_with_a_trailing_newline_is_refused():
    from examples.fastapi_backend.app import submit_job

    # HTTP clients refuse a newline in a header, so the handler is called as code that reuses it would call it;
    # the dead client shows nothing is sent (reaching Redis would answer 503)
    response = submit_job({"prompt": "x", "image": "s3://inputs/a.png", "mask_image": "s3://inputs/b.png"},
                          dead_client(), idempotency_key="order-1\n")
    assert response.status_code == 422
    assert json.loads(response.body)["error"]["field"] == "Idempotency-Key"


# --- what the page needs: the page itself, the request's schema with the service's limits, presigned uploads, CORS ---

@pytest.fixture(scope="module")
def page_http(client, stack):
    with TestClient(create_app(client, settings=stack.settings(max_steps=30, input_max_bytes=100_000),
                               cors_origins=["http://app.example"])) as test_client:
        yield test_client


def test_the_page_and_its_files_are_served(page_http):
    response = page_http.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert '<form id="job-form"' in response.text and "/static/page.js" in response.text
    assert page_http.get("/static/page.js").status_code == 200
    assert "/uploads" in page_http.get("/openapi.json").json()["paths"]  # documented at /docs


def test_the_request_schema_carries_the_services_own_limits_and_defaults(page_http):
    schema = page_http.get("/request-schema").json()
    steps = schema["properties"]["num_inference_steps"]
    assert steps["default"] == 50 and steps["minimum"] == 1 and steps["maximum"] == 30  # INPAINT_MAX_STEPS
    assert schema["properties"]["strength"]["maximum"] == 1 and schema["properties"]["strength"]["default"] == 0.6
    deadline = [branch for branch in schema["properties"]["deadline_s"]["anyOf"] if branch["type"] == "number"]
    assert deadline[0]["maximum"] == 1800
    assert schema["x-limits"]["upload_max_bytes"] == 100_000 and "image/jpeg" in schema["x-limits"]["upload_types"]


@pytest.mark.parametrize("public", [False, True], ids=["workers-endpoint", "public-endpoint"])
def test_an_upload_goes_from_the_caller_straight_to_s3_with_a_presigned_post(client, stack, monkeypatch, public):
    """With INPAINT_S3_PUBLIC_ENDPOINT_URL (the name browsers use; here `localhost` for the S3 on 127.0.0.1) the
    upload is signed for that name."""
    from worker.stack import TEST_CREDENTIALS

    for name, value in TEST_CREDENTIALS.items():  # the backend signs with its own S3 credentials
        monkeypatch.setenv(name, value)
    endpoint = f"http://localhost:{stack.s3.port}" if public else stack.s3.endpoint
    settings = stack.settings(input_max_bytes=100_000, s3_public_endpoint_url=endpoint if public else None)
    with TestClient(create_app(client, settings=settings)) as http:
        response = http.post("/uploads", json={"content_type": "image/png", "size": 1000})
    assert response.status_code == 201, response.text
    grant = response.json()
    assert grant["url"].startswith(endpoint + "/")
    assert grant["reference"].startswith("s3://inputs/uploads/page/") and grant["reference"].endswith(".png")
    body = b"\x89PNG" + bytes(996)
    sent = httpx.post(grant["url"], data=grant["fields"], files={"file": ("mask.png", body, "image/png")})
    assert sent.status_code in (200, 201, 204), sent.text
    key = grant["reference"].removeprefix("s3://inputs/")
    stored = stack.s3.client().get_object(Bucket="inputs", Key=key)
    assert stored["Body"].read() == body and stored["ContentType"] == "image/png"


def test_an_upload_of_another_type_or_over_the_size_is_refused_naming_the_field(page_http):
    response = page_http.post("/uploads", json={"content_type": "image/gif", "size": 10})
    assert response.status_code == 422 and response.json()["error"]["field"] == "content_type"
    assert "image/jpeg" in response.json()["error"]["message"]
    response = page_http.post("/uploads", json={"content_type": "image/jpeg", "size": 100_001})
    assert response.status_code == 422 and response.json()["error"]["field"] == "size"
    assert "100000" in response.json()["error"]["message"]


def test_cors_lets_only_the_configured_origins_call_the_api(page_http):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    allowed = page_http.options("/jobs", headers={"Origin": "http://app.example", **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://app.example"
    other = page_http.options("/jobs", headers={"Origin": "http://elsewhere.example", **preflight})
    assert "access-control-allow-origin" not in other.headers


def test_the_stacks_buckets_let_a_page_on_loopback_upload_and_download(stack):
    rules = stack.s3.client().get_bucket_cors(Bucket="inputs")["CORSRules"]
    assert "http://127.0.0.1:*" in rules[0]["AllowedOrigins"] and "POST" in rules[0]["AllowedMethods"]
