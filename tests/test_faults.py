"""Faults injected for real: workers killed and stopped, Redis restarted, S3 down, on a stack of their own.

Short timeouts through settings (visibility 12 s, sweeps every second) so redelivery is quick.
"""

from __future__ import annotations

import signal
import socket
import time

import pytest

from tests.support import job_request, outputs, runs, wait_for_step, workers

pytestmark = pytest.mark.slow  # workers killed and stopped, Redis restarted, S3 down, on a stack of its own

HOST = socket.gethostname()
FAST_RECOVERY = {"INPAINT_VISIBILITY_TIMEOUT_S": "12", "INPAINT_MAX_DEADLINE_S": "8", "INPAINT_DEADLINE_MARGIN_S": "2",
                 "INPAINT_UNACKED_RESTORE_INTERVAL_S": "1", "INPAINT_UNACKED_RESTORE_THROTTLE": "1",
                 "INPAINT_STORAGE_ATTEMPTS": "6", "INPAINT_STORAGE_BACKOFF_S": "0.5"}


@pytest.fixture(scope="module")
def faults(tiny_model_dir, tmp_path_factory, worker_env):
    from worker.app import make_app
    from worker.client import InpaintClient
    from worker.stack import LocalStack

    stack = LocalStack(tmp_path_factory.mktemp("faults"), model=str(tiny_model_dir), redis_appendonly=True).start()
    env = {**worker_env, **FAST_RECOVERY}
    client = InpaintClient(make_app(stack.settings(**{k.removeprefix("INPAINT_").lower(): v
                                                      for k, v in FAST_RECOVERY.items()})))
    yield stack, client, env
    stack.stop()


def slow_job(stack, steps: int = 16, step_s: float = 0.1) -> dict:
    return job_request(stack, prompt="a plum", num_inference_steps=steps, strength=1.0, seed=5,
                       plugins={"testkit": {"step_s": step_s}})


def holder(client, job_id: str, workers) -> object:
    active = client.app.control.inspect(timeout=2).active() or {}
    node = next(node for node, tasks in active.items() if any(t["id"] == job_id for t in tasks))
    return next(w for w in workers if w.node == node)


def two_workers(faults, prefix: str):
    """Two workers, ready when the block starts and stopped when it ends."""
    stack, client, env = faults
    return workers(stack, client.app, env, f"{prefix}a", f"{prefix}b")


@pytest.mark.parametrize("kill_at_step", [1, 12])
def test_sigkill_mid_job_redelivers_it_to_the_other_worker_once(faults, run_log, kill_at_step):
    stack, client, _ = faults
    with two_workers(faults, f"k{kill_at_step}") as workers:
        job_id = client.submit(slow_job(stack, steps=24))
        wait_for_step(client, job_id, 1)
        victim = holder(client, job_id, workers)
        wait_for_step(client, job_id, kill_at_step)
        killed_at = time.monotonic()
        victim.stop(signal.SIGKILL)
        status = client.wait(job_id, timeout=90)
        recovered_s = time.monotonic() - killed_at
    assert status.state == "SUCCESS", status.error
    survivor = next(w for w in workers if w is not victim)
    assert status.result.worker["node"] == survivor.node
    assert runs(run_log, job_id) == (2, 1)  # started twice, finished once
    assert outputs(stack, job_id) == ["0.png", "result.json"]
    print(f"\nSIGKILL at step {kill_at_step}: SUCCESS on the other worker {recovered_s:.1f} s after the kill")


def test_a_dropped_broker_connection_does_not_run_the_job_twice(faults, run_log):
    """kombu puts a job back in the queue when its worker's connection drops, and the job cannot be stopped."""
    import redis

    stack, client, _ = faults
    with two_workers(faults, "drop") as workers:
        job_id = client.submit(slow_job(stack, steps=24))
        wait_for_step(client, job_id, 3)
        server = redis.Redis.from_url(stack.redis.url)
        dropped = server.client_kill_filter(_type="normal", skipme=True) + \
            server.client_kill_filter(_type="pubsub", skipme=True)
        status = client.wait(job_id, timeout=90)
        time.sleep(3)  # past a sweep: a copy that was going to run would have started by now
    assert dropped > 0
    assert status.state == "SUCCESS", status.error
    logs = "".join(w.log_path.read_text() for w in workers)
    assert "waiting for it to end instead of running it twice" in logs or "this copy is dropped" in logs, logs[-3000:]
    assert runs(run_log, job_id) == (1, 1)  # started once, finished once
    assert client.status(job_id).state == "SUCCESS"
    assert outputs(stack, job_id) == ["0.png", "result.json"]


def test_sigterm_finishes_the_running_job_then_exits_and_requeues_nothing(faults, run_log):
    stack, client, env = faults
    first = stack.start_worker(f"term@{HOST}", **env).wait_ready(client.app)
    running = client.submit(slow_job(stack, steps=12))
    queued = client.submit(slow_job(stack, steps=2, step_s=0))
    wait_for_step(client, running, 2)
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(timeout=60) == 0
    assert client.status(running).state == "SUCCESS"
    assert client.status(queued).state == "PENDING"  # not taken: still queued, not lost
    second = stack.start_worker(f"after-term@{HOST}", **env).wait_ready(client.app)
    try:
        assert client.wait(queued, timeout=60).state == "SUCCESS"
        time.sleep(3)  # past a sweep: a wrongly restored copy of the first job would have started by now
    finally:
        second.stop()
    assert runs(run_log, running) == (1, 1) and runs(run_log, queued) == (1, 1)


def test_a_redis_restart_during_a_job_loses_nothing(faults, run_log):
    stack, client, env = faults
    # while Redis is away, progress reports wait for it: a longer deadline than the other tests use
    patient = {**env, "INPAINT_MAX_DEADLINE_S": "60", "INPAINT_VISIBILITY_TIMEOUT_S": "90"}
    worker = stack.start_worker(f"redis@{HOST}", **patient).wait_ready(client.app)
    try:
        running = client.submit(slow_job(stack, steps=24))
        queued = [client.submit(slow_job(stack, steps=2, step_s=0)) for _ in range(3)]
        wait_for_step(client, running, 3)
        stack.redis.restart(down_s=1.0)
        statuses = [client.wait(job_id, timeout=120) for job_id in [running, *queued]]
    finally:
        worker.stop()
    assert [s.state for s in statuses] == ["SUCCESS"] * 4, [s.error for s in statuses]
    for job_id in [running, *queued]:
        assert runs(run_log, job_id)[1] >= 1 and outputs(stack, job_id) == ["0.png", "result.json"]


def test_s3_down_during_upload_is_retried_and_the_job_succeeds_when_it_returns(faults):
    stack, client, env = faults
    worker = stack.start_worker(f"s3back@{HOST}", **env).wait_ready(client.app)
    try:
        job_id = client.submit(slow_job(stack, steps=10))
        wait_for_step(client, job_id, 8)
        stack.s3.stop()  # inputs are fetched: the next S3 call is the upload
        time.sleep(2.0)
        stack.s3.start()
        stack.create_buckets()  # moto keeps nothing across restarts
        status = client.wait(job_id, timeout=60)
    finally:
        worker.stop()
    assert status.state == "SUCCESS", status.error
    assert outputs(stack, job_id) == ["0.png", "result.json"]


def test_s3_down_past_the_retry_budget_fails_with_storage_error_and_no_result_json(faults):
    stack, client, env = faults
    worker = stack.start_worker(f"s3gone@{HOST}", **{**env, "INPAINT_STORAGE_ATTEMPTS": "3",
                                                    "INPAINT_STORAGE_BACKOFF_S": "0.2"}).wait_ready(client.app)
    try:
        job_id = client.submit(slow_job(stack, steps=10))
        wait_for_step(client, job_id, 8)
        stack.s3.stop()
        status = client.wait(job_id, timeout=60)
        stack.s3.start()
        stack.create_buckets()
    finally:
        worker.stop()
    assert status.state == "FAILURE" and status.error["code"] == "storage_error", status.error
    assert "result.json" not in outputs(stack, job_id)


def test_an_idle_worker_takes_new_work_after_redis_restarts_twice_in_a_row(faults, run_log):
    """Workers that stop consuming after a Redis reconnect (celery#8030: losses within 2-3 s, #9054, #10205,
    #10302): Redis restarted twice while the worker waits for work, then a job submitted after, runs."""
    stack, client, env = faults
    worker = stack.start_worker(f"flap@{HOST}", **env).wait_ready(client.app)
    try:
        stack.redis.restart(down_s=0.5)
        stack.redis.restart(down_s=0.5)
        restarted_at = time.monotonic()
        job_id = client.submit(slow_job(stack, steps=2, step_s=0))
        status = client.wait(job_id, timeout=60)
        took_s = time.monotonic() - restarted_at
    finally:
        worker.stop()
    assert status.state == "SUCCESS", status.error
    assert runs(run_log, job_id) == (1, 1) and outputs(stack, job_id) == ["0.png", "result.json"]
    print(f"\nRedis restarted twice while the worker was idle: a job submitted after ran, SUCCESS {took_s:.1f} s later")


def test_a_job_taken_while_the_result_backend_is_away_waits_for_it_and_runs_once(faults, run_log, tmp_path):
    """Redis away at the moment a worker takes a job (a Sentinel failover, a restart): the job is not failed for it.
    The result backend is a Redis of its own here, stopped before the job is sent (through the broker, which stays)."""
    from celery import Celery

    from worker.app import make_app
    from worker.client import InpaintClient
    from worker.protocol import TASK_NAME
    from worker.stack import RedisServer

    stack, client, env = faults
    backend = RedisServer(tmp_path / "backend").start()
    settings = stack.settings(result_backend=backend.url)
    worker = stack.start_worker(f"backend-away@{HOST}", **env, INPAINT_RESULT_BACKEND=backend.url)
    try:
        worker.wait_ready(client.app)
        backend.stop()
        sender = Celery(broker=settings.broker_url)  # no result backend: a plain send_task, as from any language
        job_id = sender.send_task(TASK_NAME, kwargs={"request": slow_job(stack, steps=2, step_s=0)},
                                  queue=settings.queue).id
        deadline = time.monotonic() + 30
        while f"inpaint[{job_id}] received" not in worker.log_path.read_text():
            assert time.monotonic() < deadline, "the worker did not receive the job"
            time.sleep(0.1)
        time.sleep(1.0)  # it tries to take the job, and finds the backend away
        backend.start()  # the same port
        status = InpaintClient(make_app(settings, client=True), settings.result_expires_s).wait(job_id, timeout=60)
    finally:
        worker.stop()
        backend.stop()
    assert status.state == "SUCCESS", status.error
    assert runs(run_log, job_id) == (1, 1) and outputs(stack, job_id) == ["0.png", "result.json"]
    assert "Redis could not be reached while taking the job (ConnectionError" in worker.log_path.read_text()
