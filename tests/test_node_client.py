"""A backend in another language: jobs sent with celery-node (npm), as the README's plain send_task section tells a
Node or Go developer, against the real stack. What it reads back is the documented shape, for good jobs and bad."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.support import box_mask, photo, upload

pytestmark = pytest.mark.slow  # the stack, a worker and a node process

NODE_CLIENT = Path(__file__).resolve().parent / "node_client"


def node_client(stack, tmp_path: Path, jobs: list[dict], protocol: int = 2) -> dict[str, dict]:
    assert shutil.which("node"), "node is needed (Debian's nodejs); make test installs the client's npm packages"
    assert (NODE_CLIENT / "node_modules" / "celery-node").is_dir(), "run: npm ci --prefix tests/node_client"
    settings = stack.settings()
    plan = tmp_path / f"plan-{uuid.uuid4().hex[:8]}.json"
    plan.write_text(json.dumps({"broker": settings.broker_url, "backend": settings.backend_url, "protocol": protocol,
                                "jobs": jobs, "timeout_s": 120}))
    done = subprocess.run(["node", str(NODE_CLIENT / "inpaint.js"), str(plan)], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def request(stack, **fields) -> dict:
    return {"prompt": "a lemon", "image": upload(stack, "node-photo.png", photo()),
            "mask_image": upload(stack, "node-mask.png", box_mask()), "seed": 3, "num_inference_steps": 6,
            "strength": 1.0, **fields}


@pytest.mark.parametrize("protocol", [1, 2])
def test_a_node_backend_sends_a_job_follows_its_progress_and_reads_its_result(stack, worker, tmp_path, protocol):
    job_id = str(uuid.uuid4())  # celery-node's own ids are UUIDs: a valid job id
    seen = node_client(stack, tmp_path, [{"id": job_id, "kwargs": {"request": request(
        stack, plugins={"testkit": {"step_s": 0.2}})}}], protocol)[job_id]
    final = seen["final"]
    assert final["status"] == "SUCCESS", final
    image = final["result"]["images"][0]
    assert image["location"] == f"s3://outputs/jobs/{job_id}/0.png" and image["url"].startswith("http")
    assert final["result"]["parameters"]["steps_run"] == 6 and final["result"]["job_id"] == job_id
    steps = [p for p in seen["progress"] if p["stage"] == "denoising"]
    assert steps and {"step", "total_steps", "percent", "eta_s", "elapsed_s"} <= set(steps[-1])
    assert steps[-1]["total_steps"] == 6


def test_a_node_backend_gets_the_documented_error_shape_for_malformed_messages_and_a_cancel(stack, worker,
                                                                                           tmp_path):
    flat, bad_id, cancelled = str(uuid.uuid4()), "order:1234", str(uuid.uuid4())
    seen = node_client(stack, tmp_path, [
        {"id": flat, "kwargs": request(stack)},  # the request's fields flat as kwargs: was a bare TypeError
        {"id": bad_id, "kwargs": {"request": request(stack)}},  # ':' is not in the job-id pattern
        {"id": cancelled, "kwargs": {"request": request(stack, num_inference_steps=40,
                                                        plugins={"testkit": {"step_s": 0.2}})},
         "cancel_when": "denoising"},
    ])
    for job_id, (code, field) in {flat: ("invalid_request", "request"), bad_id: ("invalid_request", "job_id"),
                                  cancelled: ("cancelled", None)}.items():
        final = seen[job_id]["final"]
        assert final["status"] == "FAILURE", final
        error = final["result"]  # Celery's stored exception: JobFailed(code, message, field, plugin)
        assert error["exc_type"] == "JobFailed" and error["exc_module"] == "worker.errors", error
        assert error["exc_message"][0] == code and error["exc_message"][2] == field, error
        assert isinstance(error["exc_message"][1], str) and error["exc_message"][3] is None
    assert seen[cancelled]["progress"], "the cancelled job was seen running"
