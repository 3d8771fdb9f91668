"""The distributed service against real parts: redis-server, moto's S3 server over HTTP, real worker processes."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tests.support import box_mask, data_url, objects, photo, runs, wait_for_step
from tests.support import job_request as request

pytestmark = pytest.mark.slow  # real worker processes behind redis-server and S3

HOST = socket.gethostname()
SLOW = {"testkit": {"step_s": 0.15}}


def test_a_job_ends_in_s3_with_presigned_urls_and_matches_a_local_run(stack, client, worker, runner):
    fields = request(stack, negative_prompt="blurry", plugins={"testkit": False})
    job_id = client.submit(fields)
    status = client.wait(job_id, timeout=120)
    assert status.state == "SUCCESS", status.error
    result = status.result
    s3 = stack.s3.client()
    image = result.images[0]
    assert image.location == f"s3://outputs/jobs/{job_id}/0.png"
    head = s3.head_object(Bucket="outputs", Key=f"jobs/{job_id}/0.png")
    assert head["ContentType"] == "image/png"
    stored = s3.get_object(Bucket="outputs", Key=f"jobs/{job_id}/0.png")["Body"].read()
    assert urllib.request.urlopen(image.url, timeout=10).read() == stored
    record = s3.get_object(Bucket="outputs", Key=f"jobs/{job_id}/result.json")
    assert record["ContentType"] == "application/json"
    assert b'"job_id": "%s"' % job_id.encode() in record["Body"].read()
    assert result.worker["node"] == worker.node and result.model["load_s"] > 0

    local = runner.run(**{**fields, "image": data_url(photo()), "mask_image": data_url(box_mask()), "plugins": {}})
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored))).astype(int), runner.pixels(local))


def test_progress_is_polled_with_increasing_steps_up_to_the_steps_that_run(stack, client, worker):
    job_id = client.submit(request(stack, num_inference_steps=20, strength=0.5, plugins=SLOW))
    seen = []
    while not (status := client.status(job_id)).done:
        if status.progress:
            seen.append(status.progress)
        time.sleep(0.03)
    assert status.state == "SUCCESS"
    steps = [p.step for p in seen if p.stage == "denoising"]
    assert len(steps) >= 3 and steps == sorted(steps) and max(steps) <= 10
    assert {p.total_steps for p in seen if p.total_steps} == {10}
    order = ["fetching", "preprocessing", "encoding", "denoising", "decoding", "postprocessing", "uploading"]
    stages = [p.stage for p in seen]
    assert [order.index(s) for s in stages] == sorted(order.index(s) for s in stages)
    assert all(p.eta_s is None or p.eta_s >= 0 for p in seen)


def test_cancel_a_queued_and_a_running_job(stack, client, worker):
    running = client.submit(request(stack, num_inference_steps=40, strength=1.0, plugins=SLOW))
    queued = client.submit(request(stack))
    assert client.cancel(queued) == "requested"  # while the other runs: it has not started
    wait_for_step(client, running, 2)
    assert client.cancel(running) == "requested"
    for job_id in (running, queued):
        status = client.wait(job_id, timeout=60)
        assert status.state == "FAILURE" and status.error["code"] == "cancelled", status
        assert objects(stack, job_id) == {}
    assert "step" in client.status(running).error["message"]
    assert client.status(queued).error["message"] == "cancelled before it started"
    succeeded = client.submit(request(stack))
    assert client.wait(succeeded, timeout=60).state == "SUCCESS"
    assert client.cancel(succeeded) == "ended" and client.status(succeeded).state == "SUCCESS"


def test_output_options_name_the_objects_and_their_format(stack, client, worker):
    job_id = client.submit(request(stack, output_type="webp", output={"prefix": "renders/2026", "quality": 90}))
    status = client.wait(job_id, timeout=60)
    assert status.state == "SUCCESS", status.error
    key = f"renders/2026/{job_id}/0.webp"
    assert status.result.images[0].location == f"s3://outputs/{key}"
    stored = stack.s3.client().get_object(Bucket="outputs", Key=key)
    assert stored["ContentType"] == "image/webp" and Image.open(io.BytesIO(stored["Body"].read())).format == "WEBP"
    assert objects(stack, job_id) == {}  # nothing under the default prefix


def test_the_worker_answers_remote_control_and_sends_heartbeats_during_a_long_job(stack, client, worker):
    job_id = client.submit(request(stack, num_inference_steps=40, strength=1.0, plugins=SLOW))
    wait_for_step(client, job_id, 1)
    heartbeats = []
    with client.app.connection_for_read() as connection:
        receiver = client.app.events.Receiver(connection, handlers={
            "worker-heartbeat": lambda event: heartbeats.append(event)})
        _capture(receiver, seconds=4.5)  # heartbeats come every 2 s
    assert client.app.control.ping(destination=[worker.node], timeout=2)
    active = client.app.control.inspect(destination=[worker.node], timeout=2).active()
    assert [task["id"] for task in active[worker.node]] == [job_id]
    assert any(event["hostname"] == worker.node for event in heartbeats)
    assert client.status(job_id).state == "PROGRESS"
    client.cancel(job_id)
    client.wait(job_id, timeout=60)


def test_inspect_shows_a_running_job_redacted_whoever_sent_it(stack, client, worker):
    """Flower's worker page lists running jobs through `inspect active`: no data: URL and no token there."""
    inline, token = data_url(photo(seed=5)), "tok-Active-never-shown"
    fields = request(stack, image=inline, num_inference_steps=40, strength=1.0,
                     plugins={"testkit": {"step_s": 0.15, "api_token": token}})
    job_id = f"inspect-{time.monotonic_ns()}"
    client.app.send_task("inpaint", kwargs={"request": fields}, task_id=job_id)  # plain: Celery's own kwargsrepr
    try:
        wait_for_step(client, job_id, 1)
        active = client.app.control.inspect(destination=[worker.node], timeout=2).active()
    finally:
        client.cancel(job_id)
        client.wait(job_id, timeout=60)
    [shown] = active[worker.node]
    assert shown["id"] == job_id
    text = json.dumps(shown)
    assert inline.split(",", 1)[1][:100] not in text and token not in text, text[:2000]
    assert f"({len(inline)} characters)" in shown["kwargs"] and "<redacted>" in shown["kwargs"]


def test_a_progress_report_that_reaches_redis_late_never_replaces_the_outcome(client):
    """Redis away while a job fails: its last progress report, sent when Redis is back, must not hide the FAILURE."""
    from types import SimpleNamespace

    from worker.errors import JobFailed
    from worker.schema import Progress
    from worker.tasks import TaskReporter

    def report(job_id: str) -> None:
        reporter = TaskReporter(SimpleNamespace(app=client.app, request=SimpleNamespace(hostname="t@h")), job_id)
        reporter(Progress(stage="denoising", step=3, total_steps=10))
        reporter.close()

    running, failed, done = (f"{name}-{time.monotonic_ns()}" for name in ("running", "failed", "done"))
    report(running)
    client.app.backend.store_result(failed, JobFailed("deadline_exceeded", "past its deadline"), "FAILURE")
    report(failed)
    client.app.backend.store_result(done, {"images": []}, "SUCCESS")
    report(done)
    assert client.status(running).state == "PROGRESS" and client.status(running).progress.step == 3
    assert client.status(failed).state == "FAILURE" and client.status(failed).error["code"] == "deadline_exceeded"
    assert client.app.backend.get_task_meta(done)["status"] == "SUCCESS"


def _capture(receiver, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            for _ in receiver.consume(limit=None, timeout=0.5, safety_interval=0.5):
                if time.monotonic() > deadline:
                    return
        except TimeoutError:  # no event in the last half second: keep listening until the deadline
            continue


def test_task_events_carry_progress_and_previews_without_their_signatures(stack, client, worker):
    """What Flower (and its database) keeps of a job: the progress line, previews' and results' URLs unsigned."""
    events = []
    job_id = client.submit(request(stack, num_inference_steps=20, strength=1.0, plugins=SLOW, preview_every=5))
    with client.app.connection_for_read() as connection:
        receiver = client.app.events.Receiver(connection, handlers={
            "task-progress": events.append, "task-succeeded": events.append})
        _capture(receiver, seconds=6)  # 20 slow steps: about 3 s
    assert client.wait(job_id, timeout=60).state == "SUCCESS"
    mine = [event for event in events if event["uuid"] == job_id]
    previews = [event["preview"] for event in mine if event.get("preview")]
    assert previews and all(preview.endswith(".jpg?...") for preview in previews), previews[:2]
    assert any(event.get("result", "").startswith("denoising: step") for event in mine)
    assert "Signature" not in json.dumps(mine)
    assert "Signature" in client.status(job_id).result.images[0].url  # the client's copy is signed, to fetch


def test_resubmitting_a_job_id_runs_it_once(stack, client, worker, run_log):
    job_id = f"idem-{time.monotonic_ns()}"
    assert client.submit(request(stack), job_id=job_id) == job_id
    assert client.submit(request(stack), job_id=job_id) == job_id
    first = client.wait(job_id, timeout=60)
    etags = objects(stack, job_id)
    # a backend sending the same id again by hand gets the stored result, not a second run
    client.app.send_task("inpaint", kwargs={"request": request(stack)}, task_id=job_id)
    client.wait(client.submit(request(stack)), timeout=60)  # queued behind it on the one worker
    assert first.state == "SUCCESS" and client.status(job_id).state == "SUCCESS"
    assert runs(run_log, job_id)[0] == 1
    assert objects(stack, job_id) == etags


def test_a_pickled_message_is_refused_unexecuted_and_the_worker_keeps_serving(stack, client, worker, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    with client.app.producer_or_acquire() as producer:
        producer.publish({"request": Exploit()}, serializer="pickle", routing_key="celery", exchange="",
                         headers={"task": "inpaint", "id": "pickled-1", "argsrepr": "", "kwargsrepr": ""})
    assert client.wait(client.submit(request(stack)), timeout=60).state == "SUCCESS"
    assert not marker.exists()
    assert client.status("pickled-1").state == "PENDING"


@pytest.mark.parametrize(("fields", "code", "words"), [
    ({"strength": 2}, "invalid_request", "strength"),
    ({"image": "s3://inputs/missing.png"}, "input_not_found", "no object"),
    ({"image": "s3://secret-bucket/a.png"}, "input_forbidden", "INPAINT_INPUT_BUCKETS"),
    ({"image": "https://example.com/a.png"}, "input_forbidden", "allow-list"),
    ({"image": "file:///etc/passwd"}, "input_forbidden", "not accepted"),
    ({"deadline_s": 0.3, "plugins": SLOW, "num_inference_steps": 20, "strength": 1.0}, "deadline_exceeded",
     "deadline"),
    ({"plugins": {"testkit": {"oom": True}}}, "out_of_memory", "out of memory"),
    ({"plugins": {"testkit": {"raise": "kaboom"}}}, "plugin_error", "'testkit'"),
    ({"plugins": {"testkit": {"drop_images": True}}}, "plugin_error", "returned a list of 0"),
    ({"output": {"bucket": "elsewhere"}}, "invalid_request", "writes only to"),
])
def test_each_failure_code(stack, client, worker, fields, code, words):
    job_id = f"fail-{code}-{time.monotonic_ns()}"
    client.app.send_task("inpaint", kwargs={"request": request(stack, **fields)}, task_id=job_id)
    status = client.wait(job_id, timeout=60)
    assert status.state == "FAILURE"
    assert status.error["code"] == code and words in status.error["message"], status.error
    assert objects(stack, job_id) == {}


def test_storage_error_when_the_output_bucket_is_missing(stack, client, worker_env):
    from worker.app import make_app
    from worker.client import InpaintClient

    queue_client = InpaintClient(make_app(stack.settings(queue="broken-bucket")))
    broken = stack.start_worker(f"broken@{HOST}", INPAINT_QUEUE="broken-bucket", INPAINT_OUTPUT_BUCKET="no-such-bucket",
                                INPAINT_STORAGE_ATTEMPTS="2", INPAINT_STORAGE_BACKOFF_S="0.1", **worker_env)
    try:
        broken.wait_ready(queue_client.app)
        status = queue_client.wait(queue_client.submit(request(stack)), timeout=60)
        assert status.error["code"] == "storage_error" and "no-such-bucket" in status.error["message"]
    finally:
        broken.stop()


def test_secrets_stay_out_of_results_task_state_result_json_and_logs(stack, client, worker):
    from worker.stack import TEST_CREDENTIALS

    job_id = client.submit(request(stack))
    status = client.wait(job_id, timeout=60)
    record = stack.s3.client().get_object(Bucket="outputs", Key=f"jobs/{job_id}/result.json")["Body"].read().decode()
    state = client.app.backend.client.get(f"celery-task-meta-{job_id}").decode()
    log = worker.log_path.read_text()
    secret = TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    for text in (status.model_dump_json(), record, state, log):
        assert secret not in text
    assert job_id in log  # the log is the worker's own, and it is written


def test_submit_refuses_a_malformed_job_id_before_sending(client):
    from worker.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as caught:
        client.submit({"prompt": "x", "image": "s3://inputs/a.png", "mask_image": "s3://inputs/b.png"},
                      job_id="../../etc")
    assert caught.value.field == "job_id"


def test_previews_show_in_the_progress_meta_and_are_images_in_s3(stack, client, worker):
    job_id = client.submit(request(stack, preview_every=3, num_inference_steps=12, strength=1.0,
                                   plugins={"testkit": {"step_s": 0.1}}))
    references = []
    while not (status := client.status(job_id)).done:
        if status.progress and status.progress.preview and status.progress.preview not in references:
            references.append(status.progress.preview)
        time.sleep(0.03)
    assert status.state == "SUCCESS"
    assert len(references) >= 2
    for url in references:
        assert f"jobs/{job_id}/previews/" in url
        with Image.open(io.BytesIO(urllib.request.urlopen(url, timeout=10).read())) as preview:
            assert preview.format == "JPEG" and preview.size[0] == 256
    keys = [key for key in objects(stack, job_id) if "/previews/" in key]
    assert [key.rsplit("/", 1)[1] for key in sorted(keys)] == ["0-0003.jpg", "0-0006.jpg", "0-0009.jpg", "0-0012.jpg"]


def test_the_task_state_keeps_no_copy_of_the_request(stack, client, worker):
    import json

    inline = data_url(photo(seed=3))
    job_id = client.submit(request(stack, image=inline))
    assert client.wait(job_id, timeout=60).state == "SUCCESS"
    stored = client.app.backend.client.get(f"celery-task-meta-{job_id}").decode()
    assert not {"name", "args", "kwargs"} & set(json.loads(stored)), sorted(json.loads(stored))
    assert inline.split(",", 1)[1][:200] not in stored  # the image itself is not kept for result_expires_s


def test_task_events_show_a_redacted_summary_of_the_request(stack, client, worker):
    """What Flower shows of a job (the task-sent and task-received events) holds no data: URL or secret."""
    import threading

    inline, token = data_url(photo(seed=4)), "tok-Zq9-never-shown"
    fields = request(stack, image=inline, plugins={"testkit": {"api_token": token}})
    seen: dict[str, dict] = {}
    job_id = None

    def on_event(event: dict) -> None:
        if job_id is not None and event.get("uuid") == job_id and event["type"] in ("task-sent", "task-received"):
            seen[event["type"]] = event

    with client.app.connection_for_read() as connection:
        receiver = client.app.events.Receiver(connection, handlers={"*": on_event})
        stop = threading.Timer(30, lambda: setattr(receiver, "should_stop", True))  # bounds the capture
        stop.start()
        try:
            # the first event (a heartbeat the wakeup asks for) shows the receiver listens: submit then
            for _ in receiver.consume(limit=None, timeout=None, safety_interval=0.5, wakeup=True):
                if job_id is None:
                    job_id = client.submit(fields)
                if len(seen) == 2:
                    break
        finally:
            stop.cancel()
    assert set(seen) == {"task-sent", "task-received"}, seen
    for event in seen.values():
        shown = event["kwargs"]
        assert inline.split(",", 1)[1][:100] not in shown and token not in shown, shown
        assert f"data:image/png;base64,... ({len(inline)} characters)" in shown and "<redacted>" in shown
        assert "a red apple" in shown and len(shown) <= 1024
    assert client.wait(job_id, timeout=60).state == "SUCCESS"


def test_a_cancel_of_an_id_never_submitted_does_not_cancel_it_when_it_is_submitted_later(stack, client, worker):
    job_id = f"later-{time.monotonic_ns()}"
    assert client.cancel(job_id) == "unknown"  # before anyone submitted it: nothing to cancel
    assert client.submit(request(stack), job_id=job_id) == job_id
    status = client.wait(job_id, timeout=60)
    assert status.state == "SUCCESS", status.error
    # a job sent with plain send_task has no claim: a cancel set for its id still stops it before it starts
    plain = f"plain-{time.monotonic_ns()}"
    client.cancel(plain)
    client.app.send_task("inpaint", kwargs={"request": request(stack)}, task_id=plain)
    status = client.wait(plain, timeout=60)
    assert status.state == "FAILURE" and status.error["message"] == "cancelled before it started", status


def test_a_job_id_whose_submitter_died_mid_send_is_sent_by_a_retry(stack, client, worker, run_log):
    job_id = f"crashed-{time.monotonic_ns()}"
    silent = socket.socket()  # the dying submitter's broker: takes the connection, never answers, so it is mid-send
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    submitter = subprocess.Popen([sys.executable, "-c", DYING_SUBMITTER, f"redis://127.0.0.1:{silent.getsockname()[1]}/0",
                                  stack.settings().backend_url, json.dumps(request(stack)), job_id])
    try:
        deadline = time.monotonic() + 60
        while client.redis.get(f"inpaint:submitted:{job_id}") != b"sending":
            assert submitter.poll() is None and time.monotonic() < deadline, "the submitter never claimed the id"
            time.sleep(0.05)
        submitter.kill()  # killed between its claim and its send, as a web process in a deploy
        submitter.wait(10)
    finally:
        silent.close()
    assert client.submit(request(stack), job_id=job_id) == job_id  # the backend's retry, with the same id
    status = client.wait(job_id, timeout=60)
    assert status.state == "SUCCESS", status.error
    assert runs(run_log, job_id)[0] == 1


DYING_SUBMITTER = """
import json, sys
from worker.app import make_app
from worker.client import InpaintClient
from worker.settings import Settings
broker, backend, request, job_id = sys.argv[1:]
settings = Settings(broker_url=broker, result_backend=backend)
InpaintClient(make_app(settings, client=True), claim_hold_s=2).submit(json.loads(request), job_id=job_id)
"""


def test_the_same_job_id_submitted_at_once_by_many_callers_is_queued_once(stack):
    from worker.app import make_app
    from worker.client import InpaintClient

    queue = f"unserved-{time.monotonic_ns()}"  # no worker takes from it: the queue shows every message sent
    unserved = InpaintClient(make_app(stack.settings(queue=queue), client=True))
    job_id = f"race-{time.monotonic_ns()}"
    try:
        with ThreadPoolExecutor(8) as pool:
            returned = list(pool.map(lambda _: unserved.submit(request(stack), job_id=job_id), range(8)))
        assert returned == [job_id] * 8
        assert unserved.redis.llen(queue) == 1
        assert unserved.submit(request(stack), job_id=job_id) == job_id and unserved.redis.llen(queue) == 1
        queued = unserved.status(job_id)  # Celery reads it PENDING, as an unknown id; the claim tells them apart
        assert queued.state == "PENDING" and queued.submitted is True
    finally:
        unserved.redis.delete(queue)
