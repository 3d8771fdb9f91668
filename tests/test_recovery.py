"""A crashed worker's job runs again on a live worker within seconds, with the default settings (a visibility
timeout of an hour): the job's lease lapses and a live worker puts its message back (worker/requeue.py).

Real worker processes on a stack of their own, killed with SIGKILL, frozen with SIGSTOP. Each test prints the
recovery time; docs/RELIABILITY.md records them.
"""

from __future__ import annotations

import random
import signal
import time

import pytest

from tests.support import job_request, outputs, runs, wait_for_step, workers

pytestmark = pytest.mark.slow  # real workers killed and frozen

STEPS, STEP_S = 24, 0.1
# what the job takes on its own (steps, and a few seconds to load inputs, decode and upload on a busy 2-core
# machine), plus the 30 s the recovery may take: a job that came back only after the visibility timeout (an hour)
# fails this
RECOVERED_WITHIN_S = 30 + STEPS * STEP_S + 15


@pytest.fixture(scope="module")
def recovery(tiny_model_dir, tmp_path_factory, worker_env):
    from worker.app import make_app
    from worker.client import InpaintClient
    from worker.settings import Settings
    from worker.stack import LocalStack

    stack = LocalStack(tmp_path_factory.mktemp("recovery"), model=str(tiny_model_dir)).start()
    client = InpaintClient(make_app(stack.settings()))
    assert stack.settings().visibility_timeout_s == Settings.model_fields["visibility_timeout_s"].default == 3600
    yield stack, client
    stack.stop()


def running_on(client, job_id: str, candidates: list) -> object:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        active = client.app.control.inspect(timeout=2).active() or {}
        nodes = [node for node, tasks in active.items() if any(task["id"] == job_id for task in tasks)]
        if nodes:
            return next(worker for worker in candidates if worker.node == nodes[0])
    raise AssertionError(f"{job_id} is not running on any of {[w.node for w in candidates]}")


def slow_job(stack, steps: int = STEPS, step_s: float = STEP_S, **testkit) -> dict:
    return job_request(stack, prompt="a quince", num_inference_steps=steps, strength=1.0, seed=9,
                       plugins={"testkit": {"step_s": step_s, **testkit}})


def logs(*started) -> str:
    return "".join(worker.log_path.read_text() for worker in started)


@pytest.mark.parametrize("kill_at_step", random.Random(2026).sample(range(1, STEPS), 2))
def test_a_job_whose_worker_is_killed_runs_again_on_the_other_within_seconds(recovery, worker_env, run_log,
                                                                               kill_at_step):
    stack, client = recovery
    with workers(stack, client.app, worker_env, f"kill{kill_at_step}-a", f"kill{kill_at_step}-b") as pair:
        job_id = client.submit(slow_job(stack))
        victim = running_on(client, job_id, pair)
        wait_for_step(client, job_id, kill_at_step)
        killed_at = time.monotonic()
        victim.stop(signal.SIGKILL)
        status = client.wait(job_id, timeout=RECOVERED_WITHIN_S)
        recovered_s = time.monotonic() - killed_at
        survivor = next(worker for worker in pair if worker is not victim)
        assert "put back at the front of its queue" in logs(survivor)
    assert status.state == "SUCCESS", status.error
    assert status.result.worker["node"] == survivor.node
    assert runs(run_log, job_id) == (2, 1)  # started twice, finished once
    assert outputs(stack, job_id) == ["0.png", "result.json"]
    print(f"\nSIGKILL at step {kill_at_step} of {STEPS}: SUCCESS on the other worker {recovered_s:.1f} s after it")


def test_the_jobs_of_a_lost_host_run_on_another_host(recovery, worker_env, run_log):
    stack, client = recovery
    steps, step_s = 60, 0.3  # long enough to be running still once host b's worker is up
    with workers(stack, client.app, worker_env, "host-a-gpu0", "host-a-gpu1") as host_a:
        jobs = [client.submit(slow_job(stack, steps, step_s)) for _ in host_a]
        victims = {running_on(client, job_id, host_a) for job_id in jobs}
        assert victims == set(host_a)  # one job on each of host a's workers
        with workers(stack, client.app, worker_env, "host-b-gpu0") as (host_b,):
            assert not any(client.status(job_id).done for job_id in jobs)
            killed_at = time.monotonic()
            for worker in host_a:  # the whole host at once, none restarted
                worker.stop(signal.SIGKILL)
            while not all(f"job {job_id}: its worker died" in logs(host_b) for job_id in jobs):
                assert time.monotonic() - killed_at < 30, "host b did not take the jobs back within 30 s"
                time.sleep(0.1)
            put_back_s = time.monotonic() - killed_at
            statuses = [client.wait(job_id, timeout=30 + 2 * (steps * step_s + 10)) for job_id in jobs]
            recovered_s = time.monotonic() - killed_at
    assert [status.state for status in statuses] == ["SUCCESS", "SUCCESS"], [s.error for s in statuses]
    assert {status.result.worker["node"] for status in statuses} == {host_b.node}
    assert all(runs(run_log, job_id) == (2, 1) and outputs(stack, job_id) == ["0.png", "result.json"]
               for job_id in jobs)
    print(f"\nhost lost: both jobs back in the queue {put_back_s:.1f} s after the kill, SUCCESS on the other host "
          f"{recovered_s:.1f} s after it (one after the other)")


def test_a_frozen_worker_loses_its_job_and_writes_no_second_outcome_when_it_wakes(recovery, worker_env, run_log):
    stack, client = recovery
    with workers(stack, client.app, worker_env, "frozen-a", "frozen-b") as pair:
        job_id = client.submit(slow_job(stack))
        frozen = running_on(client, job_id, pair)
        other = next(worker for worker in pair if worker is not frozen)
        wait_for_step(client, job_id, 3)
        frozen.process.send_signal(signal.SIGSTOP)  # alive, but not for longer than its lease
        frozen_at = time.monotonic()
        status = client.wait(job_id, timeout=RECOVERED_WITHIN_S)
        recovered_s = time.monotonic() - frozen_at
        assert status.state == "SUCCESS" and status.result.worker["node"] == other.node, status.error
        written = outputs(stack, job_id)
        frozen.process.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 30
        while "ends without an outcome" not in logs(frozen):
            assert time.monotonic() < deadline, logs(frozen)[-3000:]
            time.sleep(0.2)
    assert client.status(job_id).state == "SUCCESS" and client.status(job_id).result.worker["node"] == other.node
    assert outputs(stack, job_id) == written == ["0.png", "result.json"]
    assert runs(run_log, job_id) == (2, 1)  # the frozen run never finished
    print(f"\nSIGSTOP at step 3 of {STEPS}: SUCCESS on the other worker {recovered_s:.1f} s after")


def test_a_worker_killed_while_uploading_has_its_job_run_again(recovery, worker_env, run_log):
    stack, client = recovery
    with workers(stack, client.app, worker_env, "upload-a", "upload-b") as pair:
        job_id = client.submit(slow_job(stack, upload_s=3))
        victim = running_on(client, job_id, pair)
        deadline = time.monotonic() + 60
        while (progress := client.status(job_id).progress) is None or progress.stage != "uploading":
            assert time.monotonic() < deadline, "the job never reached its upload"
            time.sleep(0.05)
        killed_at = time.monotonic()
        victim.stop(signal.SIGKILL)
        status = client.wait(job_id, timeout=RECOVERED_WITHIN_S + 6)
        recovered_s = time.monotonic() - killed_at
    assert status.state == "SUCCESS", status.error
    assert runs(run_log, job_id) == (2, 1)
    assert outputs(stack, job_id) == ["0.png", "result.json"]
    print(f"\nSIGKILL during the upload: SUCCESS on the other worker {recovered_s:.1f} s after")


def test_a_frozen_worker_that_wakes_while_the_rerun_runs_leaves_the_job_recoverable(recovery, worker_env, run_log):
    """Its late reject must not remove the rerun's record of the job: when the rerun's worker dies too, the job
    still comes back (kombu keeps a message's delivery tag across restores; the sweep gives it a new one)."""
    stack, client = recovery
    with workers(stack, client.app, worker_env, "woken-a", "woken-b") as pair:
        job_id = client.submit(slow_job(stack, steps=40, step_s=0.3))
        frozen = running_on(client, job_id, pair)
        other = next(worker for worker in pair if worker is not frozen)
        wait_for_step(client, job_id, 3)
        frozen.process.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + RECOVERED_WITHIN_S
        while client.status(job_id).result is None and (client.status(job_id).progress or None) is not None \
                and "put back at the front of its queue" not in logs(other):  # the sweep requeued it
            assert time.monotonic() < deadline
            time.sleep(0.2)
        wait_for_step(client, job_id, 3)  # the rerun, on the other worker
        frozen.process.send_signal(signal.SIGCONT)
        while "ends without an outcome" not in logs(frozen):
            assert time.monotonic() < deadline + 30, logs(frozen)[-3000:]
            time.sleep(0.2)
        other.stop(signal.SIGKILL)  # the rerun's worker dies too: the woken one must get the job back
        status = client.wait(job_id, timeout=RECOVERED_WITHIN_S + 40 * 0.3)
    assert status.state == "SUCCESS" and status.result.worker["node"] == frozen.node, status.error
    assert outputs(stack, job_id) == ["0.png", "result.json"]


def test_one_worker_from_launch_killed_mid_job_runs_it_again_once_restarted(recovery, worker_env, run_log, tmp_path):
    """The issue's own reproduction: one CPU worker from `inpaint-worker launch`, the default settings, SIGKILL to
    the worker process at step 4; the launcher restarts it, and the restarted worker finds the dead one's job (its
    lease lapsed) and runs it: no second worker, no hour-long wait for the visibility timeout."""
    import os
    import subprocess
    import sys

    from worker.app import make_app
    from worker.client import InpaintClient

    stack, _ = recovery
    client = InpaintClient(make_app(stack.settings(queue="relaunch")))
    env = {**os.environ, **stack.env(), **worker_env, "CUDA_VISIBLE_DEVICES": ""}
    with open(tmp_path / "launch.log", "wb") as log:
        launcher = subprocess.Popen([sys.executable, "-m", "worker.cli", "launch", "--cpu-workers", "1", "--queues",
                                     "relaunch"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not (stats := client.app.control.inspect(timeout=1).stats() or {}):
            assert time.monotonic() < deadline and launcher.poll() is None, (tmp_path / "launch.log").read_text()
        (node, first), = stats.items()
        job_id = client.submit(slow_job(stack, steps=200), queue="relaunch")
        wait_for_step(client, job_id, 4)
        killed_at = time.monotonic()
        os.kill(first["pid"], signal.SIGKILL)
        while f"job {job_id}: its worker died" not in (tmp_path / "launch.log").read_text():  # the sweep
            assert time.monotonic() - killed_at < 30, (tmp_path / "launch.log").read_text()[-3000:]
            time.sleep(0.1)
        requeued_s = time.monotonic() - killed_at
        while runs(run_log, job_id)[0] < 2:  # started again
            assert time.monotonic() - killed_at < 60, client.status(job_id)
            time.sleep(0.1)
        running_s = time.monotonic() - killed_at
        status = client.wait(job_id, timeout=200 * STEP_S + 60)
        again = client.app.control.inspect(timeout=2).stats() or {}
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            launcher.kill()
    assert status.state == "SUCCESS", status.error
    assert again[node]["pid"] != first["pid"] and status.result.worker["node"] == node  # the restarted worker
    assert runs(run_log, job_id) == (2, 1) and outputs(stack, job_id) == ["0.png", "result.json"]
    print(f"\none worker from launch, SIGKILL at step 4 of 200: restarted, the job put back {requeued_s:.1f} s and "
          f"running again {running_s:.1f} s after the kill")


def test_a_dead_workers_job_says_it_was_requeued_and_where_it_waits_until_a_worker_takes_it(recovery, worker_env,
                                                                                            run_log):
    """Its state is `PROGRESS` at stage `requeued` with its place in the queue, not a frozen step. The sweep runs on
    a worker of another queue (it takes none of this queue's jobs), so the job waits until a worker comes."""
    stack, client = recovery
    with workers(stack, client.app, {**worker_env, "INPAINT_QUEUE": "elsewhere"}, "sweeps-only"):
        with workers(stack, client.app, worker_env, "dies") as (victim,):
            job_id = client.submit(slow_job(stack))
            wait_for_step(client, job_id, 3)
            killed_at = time.monotonic()
            victim.stop(signal.SIGKILL)
            while (status := client.status(job_id)).progress is None or status.progress.stage != "requeued":
                assert time.monotonic() - killed_at < 30, status
                time.sleep(0.1)
            requeued_s = time.monotonic() - killed_at
        assert status.state == "PROGRESS" and status.queue is not None, status
        assert (status.queue.queue, status.queue.position) == (stack.settings().queue, 1), status.queue
        with workers(stack, client.app, worker_env, "comes-later") as (rescuer,):
            final = client.wait(job_id, timeout=60)
    assert final.state == "SUCCESS" and final.result.worker["node"] == rescuer.node, final.error
    assert runs(run_log, job_id) == (2, 1) and outputs(stack, job_id) == ["0.png", "result.json"]
    print(f"\nSIGKILL with no other worker of the queue: stage 'requeued', position 1, {requeued_s:.1f} s after")


def test_a_job_cancelled_just_before_its_worker_died_is_not_run_again(recovery, worker_env, run_log):
    """The cancel is asked for during a long step and the worker killed before it could see it: the sweep puts the
    job back, and the worker that takes it ends it as `cancelled` without running it."""
    stack, client = recovery
    with workers(stack, client.app, worker_env, "cancel-a", "cancel-b") as pair:
        job_id = client.submit(slow_job(stack, steps=6, step_s=3.0))
        victim = running_on(client, job_id, pair)
        wait_for_step(client, job_id, 1)
        assert client.cancel(job_id) == "requested"
        victim.stop(signal.SIGKILL)  # within the step: the cancel was not seen
        status = client.wait(job_id, timeout=RECOVERED_WITHIN_S)
        survivor = next(worker for worker in pair if worker is not victim)
        assert "put back at the front of its queue" in logs(survivor)
    assert status.state == "FAILURE" and status.error["code"] == "cancelled", status
    assert runs(run_log, job_id) == (1, 0)  # started once, by the worker that died; not run again
    assert outputs(stack, job_id) == []


def test_a_live_worker_whose_step_outlasts_the_lease_keeps_its_job(recovery, worker_env, run_log):
    """Alive but slow: one step of 20 s, longer than the 15 s lease. Its lease is renewed by a thread of its own,
    so the sweeps on the other worker never take the job from it."""
    from worker.protocol import LEASE_S

    stack, client = recovery
    step_s = LEASE_S + 5
    with workers(stack, client.app, worker_env, "slow-a", "slow-b") as pair:
        job_id = client.submit(slow_job(stack, steps=1, step_s=step_s))
        runner = running_on(client, job_id, pair)
        status = client.wait(job_id, timeout=step_s + 60)
    assert status.state == "SUCCESS" and status.result.worker["node"] == runner.node, status.error
    assert runs(run_log, job_id) == (1, 1)
    assert "put back at the front of its queue" not in logs(*pair)
    assert status.result.timings["denoising"] >= step_s


def test_a_protocol_1_message_is_known_as_a_job_by_the_sweep(recovery):
    import json

    import redis

    from worker.app import make_app
    from worker.requeue import inpaint_job_id

    stack, client = recovery
    sender = make_app(stack.settings(), client=True)
    sender.conf.task_protocol = 1  # as celery-node sends by default, its task name and id in the body
    sent = sender.send_task("inpaint", kwargs={"request": {"prompt": "a fig"}}, queue="nobody-takes-this")
    raw = redis.Redis.from_url(stack.redis.url).lindex("nobody-takes-this", -1)
    assert inpaint_job_id(json.loads(raw)) == sent.id
