"""Flower with the repository's flower.cfg, against the real stack: authentication, workers, finished tasks."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.support import box_mask, photo, upload
from worker.stack import FLOWER_CONF, FlowerProcess, free_port, stop_process, wait_started

pytestmark = pytest.mark.slow  # starts Flower beside real workers

pytest.importorskip("flower")

SLOW = {"testkit": {"step_s": 0.15}}


@pytest.fixture(scope="module")
def flower(stack, tmp_path_factory):
    # started before the module's jobs: Flower knows only the events it has seen
    process = FlowerProcess(stack.redis.url, tmp_path_factory.mktemp("flower")).start()
    yield process
    process.stop()
    assert process.process.returncode is not None


def get(flower: FlowerProcess, path: str, credentials: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()} if credentials else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(flower.url + path, headers=headers), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def api(flower: FlowerProcess, path: str) -> dict:
    status, body = get(flower, path, flower.credentials)
    assert status == 200, (path, status, body[:200])
    return json.loads(body)


def task_state(flower: FlowerProcess, task_id: str) -> str | None:
    status, body = get(flower, f"/api/task/info/{task_id}", flower.credentials)
    return json.loads(body)["state"] if status == 200 else None  # 404 until Flower has seen an event of it


def poll(check, timeout: float = 30, interval: float = 0.25):
    """The first truthy value of check() within timeout seconds (events reach Flower asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def test_the_api_and_the_pages_refuse_requests_without_the_right_credentials(flower):
    assert get(flower, "/api/workers")[0] == 401
    assert get(flower, "/api/tasks")[0] == 401
    assert get(flower, "/")[0] == 401
    assert get(flower, "/api/workers", f"{flower.user}:wrong")[0] == 401
    assert get(flower, "/api/workers", f"someone:{flower.password}")[0] == 401
    assert get(flower, "/api/workers", flower.credentials)[0] == 200


def test_the_worker_is_online_during_a_long_job_and_the_finished_task_is_listed(stack, client, worker, flower):
    # Flower's HTTP port opens before its event receiver subscribes, and events sent before that are lost to it
    # (the task's name comes with the first): a heartbeat of this worker shows the receiver is listening
    assert poll(lambda: api(flower, "/api/workers?status=1").get(worker.node) is True), "Flower hears no events"
    job_id = client.submit({"prompt": "a red apple", "image": upload(stack, "flower-photo.png", photo()),
                            "mask_image": upload(stack, "flower-mask.png", box_mask()), "seed": 1,
                            "num_inference_steps": 40, "strength": 1.0, "plugins": SLOW})
    assert poll(lambda: (p := client.status(job_id).progress) and p.stage == "denoising"), "the job did not start"

    # the job's task-progress events show in Flower as the custom state PROGRESS, with its stage and step
    assert poll(lambda: task_state(flower, job_id) == "PROGRESS"), task_state(flower, job_id)
    shown = poll(lambda: re.fullmatch(r"denoising: step \d+ of 40, about \d+ s left",
                                      str(api(flower, f"/api/task/info/{job_id}").get("result"))))
    assert shown, api(flower, f"/api/task/info/{job_id}")
    page = get(flower, f"/task/{job_id}", flower.credentials)[1].decode()
    assert re.search(r"denoising: step \d+ of 40", page) or client.status(job_id).done
    # while it still runs: the worker answers Flower's inspect, and its heartbeats say it is online
    workers = poll(lambda: api(flower, "/api/workers?refresh=1").get(worker.node))
    assert workers, "Flower's inspect did not list the worker"
    assert workers["stats"]["pid"] == worker.process.pid
    assert "inpaint" in workers["registered"]
    assert poll(lambda: api(flower, "/api/workers?status=1").get(worker.node) is True)
    assert not client.status(job_id).done, "the job ended before Flower was asked"

    assert client.wait(job_id, timeout=120).state == "SUCCESS"
    task = poll(lambda: (t := api(flower, "/api/tasks").get(job_id)) and t["state"] == "SUCCESS" and t)
    assert task, api(flower, "/api/tasks").get(job_id)
    assert task["name"] == "inpaint" and task["worker"] == worker.node
    # the result as Flower keeps it: a line that fits (Celery's repr of the result dict was cut at 1 KB), no signature
    assert re.fullmatch(rf"1 image 64x64 png in [\d.]+ s \(40 steps\): s3://outputs/\S+/{job_id}/0\.png",
                        task["result"]), task["result"]
    assert "Signature" not in json.dumps(task)
    assert task["runtime"] > 40 * 0.15 * 0.5  # 40 slow steps ran in it


@pytest.mark.parametrize("credentials", [None, "", "a-bare-secret-Zq9", "ops:", ":secret-Zq9", "ops:x,secret-Zq9"])
def test_flower_does_not_start_without_usable_credentials(stack, tmp_path, credentials):
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    if credentials is not None:
        env["FLOWER_BASIC_AUTH"] = credentials
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "celery", "--broker", stack.redis.url, "flower",
                                f"--conf={FLOWER_CONF}", f"--port={port}", "--address=127.0.0.1"], env=env,
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = process.communicate(timeout=60)
    finally:
        stop_process(process, timeout=10)
    assert process.returncode != 0
    assert b"FLOWER_BASIC_AUTH must be set" in output
    assert b"Zq9" not in output  # a malformed entry may be a bare password: it is never echoed
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2)
    assert not list(tmp_path.glob("flower.db*"))


def listening(port: int) -> set[str]:
    """The addresses with a socket listening on `port`, from Linux's /proc/net/tcp and tcp6."""
    import ipaddress
    import struct

    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, _, port_hex = local.partition(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN; each 32-bit word in the host's byte order
                words = b"".join(struct.pack("=I", int(address[i:i + 8], 16)) for i in range(0, len(address), 8))
                found.add(str(ipaddress.ip_address(words)))
    return found


@pytest.mark.parametrize("address", [None, "", "127.0.0.2"])
def test_flower_listens_on_loopback_unless_flower_address_says_otherwise(stack, tmp_path, address):
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("reads the listening sockets from Linux's /proc/net/tcp")
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_ADDRESS"}
    env.update(FLOWER_BASIC_AUTH="ops:secret-Zq9", FLOWER_DB=str(tmp_path / "flower.db"))
    if address is not None:
        env["FLOWER_ADDRESS"] = address
    expected = address or "127.0.0.1"
    port, log_path = free_port(), tmp_path / "flower.log"
    # as the README runs it: no --address flag
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "celery", "--broker", stack.redis.url, "flower",
                                    f"--conf={FLOWER_CONF}", f"--port={port}"], env=env, cwd=tmp_path, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        wait_started(lambda: urllib.request.urlopen(f"http://{expected}:{port}/healthcheck", timeout=1).status == 200,
                     60, "Flower", process, log_path)
        assert listening(port) == {expected}  # not 0.0.0.0 or :: (every interface)
    finally:
        stop_process(process, timeout=10)


def test_a_job_that_fails_shows_no_result_not_its_last_progress(stack, client, worker, flower):
    assert poll(lambda: api(flower, "/api/workers?status=1").get(worker.node) is True), "Flower hears no events"
    job_id = client.submit({"prompt": "a pear", "image": upload(stack, "flower-photo.png", photo()),
                            "mask_image": upload(stack, "flower-mask.png", box_mask()), "seed": 1,
                            "num_inference_steps": 40, "strength": 1.0, "plugins": SLOW})
    assert poll(lambda: "denoising" in str(api(flower, f"/api/task/info/{job_id}").get("result"))), \
        "Flower shows no progress"
    client.cancel(job_id)
    assert client.wait(job_id, timeout=60).state == "FAILURE"
    task = poll(lambda: (t := api(flower, f"/api/task/info/{job_id}")) and t["state"] == "FAILURE" and t)
    assert task and task["result"].startswith("failed: cancelled: ") and "cancelled" in task["exception"], task
    assert "denoising" not in task["result"]


def task_rows(flower: FlowerProcess, search: str) -> dict[str, dict]:
    """The Tasks page's rows for a search, fetched as the page fetches them (its datatable endpoint)."""
    query = urllib.parse.urlencode({"draw": 1, "start": 0, "length": 100, "search[value]": search,
                                    "order[0][column]": 0, "order[0][dir]": "desc", "columns[0][data]": "received"})
    return {row["uuid"]: row for row in api(flower, f"/tasks/datatable?{query}")["data"]}


def test_the_task_list_shows_a_running_jobs_stage_and_step_and_a_failures_code(stack, client, worker, flower):
    assert poll(lambda: api(flower, "/api/workers?status=1").get(worker.node) is True), "Flower hears no events"
    page = get(flower, "/tasks?state=PROGRESS", flower.credentials)[1].decode()
    assert ">Result<" in page and ">Started<" in page  # flower.cfg's columns
    job_id = client.submit({"prompt": "a plum", "image": upload(stack, "flower-photo.png", photo()),
                            "mask_image": upload(stack, "flower-mask.png", box_mask()), "seed": 1,
                            "num_inference_steps": 40, "strength": 1.0, "plugins": SLOW})
    running = poll(lambda: (row := task_rows(flower, "state:PROGRESS").get(job_id))
                   and re.fullmatch(r"denoising: step \d+ of 40, about \d+ s left", row["result"] or "") and row)
    assert running, task_rows(flower, "").get(job_id)
    client.cancel(job_id)
    bad = client.app.send_task("inpaint", kwargs={"request": {"prompt": "a plum", "image": "data:image/png;base64,AAAA",
                                                              "mask_image": "s3://inputs/flower-mask.png"}})
    assert client.wait(bad.id, timeout=60).state == "FAILURE"
    failed = poll(lambda: (row := task_rows(flower, "state:FAILURE").get(bad.id)) and row)
    assert failed and failed["result"].startswith("failed: invalid_request (image): image: "), failed


def test_a_copy_of_a_job_that_ended_changes_nothing_flower_shows(stack, client, worker, flower):
    assert poll(lambda: api(flower, "/api/workers?status=1").get(worker.node) is True), "Flower hears no events"
    request = {"prompt": "a fig", "image": upload(stack, "flower-photo.png", photo()),
               "mask_image": upload(stack, "flower-mask.png", box_mask()), "seed": 1, "num_inference_steps": 2}
    job_id = client.submit(request)
    assert client.wait(job_id, timeout=60).state == "SUCCESS"
    before = poll(lambda: (t := api(flower, f"/api/task/info/{job_id}")) and t["state"] == "SUCCESS" and t)
    received = poll(lambda: get_workers(flower).get(worker.node, {}).get("task-received"))

    client.app.send_task("inpaint", kwargs={"request": request}, task_id=job_id)  # a copy: a lost ack, a double send
    after_it = client.submit(request)  # the worker takes messages in order: once this one ran, the copy was dropped
    assert client.wait(after_it, timeout=60).state == "SUCCESS"
    assert poll(lambda: (t := api(flower, f"/api/task/info/{after_it}")) and t["state"] == "SUCCESS")
    after = api(flower, f"/api/task/info/{job_id}")
    assert (after["state"], after["received"], after["started"], after["succeeded"]) == \
        (before["state"], before["received"], before["started"], before["succeeded"])
    assert get_workers(flower)[worker.node]["task-received"] == received + 1  # the new job only, not the copy


def get_workers(flower: FlowerProcess) -> dict[str, dict]:
    """The Workers page's rows by worker, with their event counters ("task-received" is its Processed column)."""
    return {row["hostname"]: row for row in api(flower, "/workers?json=1")["data"]}


@pytest.mark.parametrize("protocol", [1, 2])
def test_flower_shows_a_request_redacted_whoever_sent_it(stack, client, worker, flower, protocol):
    from worker.app import make_app

    assert poll(lambda: api(flower, "/api/workers?status=1").get(worker.node) is True), "Flower hears no events"
    sender = make_app(stack.settings(), client=True)
    sender.conf.task_protocol = protocol  # protocol 1 messages carry the whole request as their repr
    request = {"prompt": "a pear as in https://cdn.example.com/p.png?X-Amz-Signature=Zq9secret",
               "image": upload(stack, "flower-photo.png", photo()),
               "mask_image": upload(stack, "flower-mask.png", box_mask()), "num_inference_steps": 2}
    sent = sender.send_task("inpaint", kwargs={"request": request})  # no kwargsrepr, as celery-node sends it
    assert client.wait(sent.id, timeout=60).state == "SUCCESS"
    task = poll(lambda: (t := api(flower, f"/api/task/info/{sent.id}")) and t["state"] == "SUCCESS" and t)
    assert task and "a pear as in https://cdn.example.com/p.png?..." in task["kwargs"], task
    assert "Zq9secret" not in json.dumps(task)
