"""Who goes first: priorities (0 the most urgent), named queues, a queued job's place and estimated start, and the
queue metrics an autoscaler reads, against real workers each on a queue of its own."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from tests.support import job_request

pytestmark = pytest.mark.slow  # real workers and Redis

HOST = socket.gethostname()


def queue_name() -> str:
    return f"q{uuid.uuid4().hex[:8]}"  # a queue of the test's own: the session's worker takes from the default one


def started_order(run_log, job_ids: list[str]) -> list[str]:
    """The jobs in the order the testkit plugin saw them start."""
    words = run_log.read_text().split()
    return sorted(job_ids, key=words.index)


def test_an_urgent_job_sent_behind_20_of_the_least_urgent_starts_next(stack, client, worker_env, run_log):
    queue = queue_name()
    worker = stack.start_worker(f"prio@{HOST}", INPAINT_QUEUE=queue, **worker_env).wait_ready(client.app)
    try:
        busy = client.submit(job_request(stack, num_inference_steps=10, strength=1.0,
                                         plugins={"testkit": {"step_s": 0.3}}), queue=queue)
        while client.status(busy).state == "PENDING":  # the worker holds it: the rest wait
            time.sleep(0.05)
        batch = [client.submit(job_request(stack, num_inference_steps=2, priority=9), queue=queue) for _ in range(20)]
        urgent = client.submit(job_request(stack, num_inference_steps=2, priority=0), queue=queue)
        twentieth, first = client.status(batch[-1]), client.status(urgent)
        assert twentieth.state == "PENDING" and twentieth.queue is not None, twentieth
        assert (twentieth.queue.queue, twentieth.queue.position, twentieth.queue.waiting) == (queue, 21, 21)
        assert (first.queue.position, first.queue.waiting) == (1, 21)  # sent last, goes first
        assert client.status(batch[0]).queue.position == 2
        for job_id in [busy, urgent, *batch]:
            assert client.wait(job_id, timeout=120).state == "SUCCESS"
    finally:
        worker.stop()
    assert started_order(run_log, [busy, urgent, *batch]) == [busy, urgent, *batch]


def test_a_named_queue_is_served_only_by_the_workers_that_take_it(stack, client, worker_env):
    interactive, batch = queue_name(), queue_name()
    worker = stack.start_worker(f"batch@{HOST}", INPAINT_QUEUE=batch, **worker_env).wait_ready(client.app)
    try:
        waiting = client.submit(job_request(stack, num_inference_steps=2), queue=interactive)
        done = client.submit(job_request(stack, num_inference_steps=2), queue=batch)
        assert client.wait(done, timeout=60).state == "SUCCESS"
        status = client.status(waiting)
        assert status.state == "PENDING" and (status.queue.queue, status.queue.position) == (interactive, 1)
    finally:
        worker.stop()
    other = stack.start_worker(f"interactive@{HOST}", INPAINT_QUEUE=interactive, **worker_env).wait_ready(client.app)
    try:
        assert client.wait(waiting, timeout=60).state == "SUCCESS"
    finally:
        other.stop()


def test_a_queued_job_is_told_when_it_may_start_once_the_queue_has_a_pace(stack, client, worker_env):
    queue = queue_name()
    worker = stack.start_worker(f"pace@{HOST}", INPAINT_QUEUE=queue, **worker_env).wait_ready(client.app)
    try:
        for _ in range(3):  # the pace: how often a job of the queue ended lately
            assert client.wait(client.submit(job_request(stack, num_inference_steps=2), queue=queue)).done
        busy = client.submit(job_request(stack, num_inference_steps=8, strength=1.0,
                                         plugins={"testkit": {"step_s": 1.0}}), queue=queue)
        while client.status(busy).state == "PENDING":
            time.sleep(0.05)
        queued = [client.submit(job_request(stack, num_inference_steps=2), queue=queue) for _ in range(3)]
        places = [client.status(job_id).queue for job_id in queued]
        assert [place.position for place in places] == [1, 2, 3], (places, client.status(busy))
        assert all(place.starts_in_s is not None and place.starts_in_s > 0 for place in places)
        assert places[0].starts_in_s < places[1].starts_in_s < places[2].starts_in_s
        for job_id in [busy, *queued]:
            assert client.wait(job_id, timeout=60).state == "SUCCESS"
        assert client.status(queued[-1]).queue is None  # no place once it ran
    finally:
        worker.stop()


def test_the_metrics_exporter_reports_each_queues_depth_by_priority_and_its_oldest_wait(stack, client, tmp_path):
    from worker.stack import free_port

    queue = queue_name()  # nobody serves it: its jobs wait
    for priority in (0, 9, 9):
        client.submit(job_request(stack, num_inference_steps=2, priority=priority), queue=queue)
    port = free_port()
    env = {**os.environ, **{f"INPAINT_{k.upper()}": str(v) for k, v in (("broker_url", stack.settings().broker_url),
                                                                         ("result_backend",
                                                                          stack.settings().backend_url))}}
    process = subprocess.Popen([sys.executable, "-m", "worker.cli", "metrics", "--port", str(port), "--queues",
                                f"{queue},celery"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
                time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(timeout=10)
    depth = {priority: float(value) for priority, value in
             re.findall(rf'inpaint_queue_depth{{priority="(\d)",queue="{queue}"}} ([\d.]+)', text)}
    assert depth == {"0": 1.0, "3": 0.0, "6": 0.0, "9": 2.0}, text
    oldest = re.search(rf'inpaint_queue_oldest_wait_seconds{{queue="{queue}"}} ([\d.]+)', text)
    assert oldest and float(oldest.group(1)) > 0
