"""200 jobs on two workers, a tenth cancelled at random moments: each ends once, none lost, none run twice."""

from __future__ import annotations

import random
import socket
import statistics
import time

import pytest

from tests.support import box_mask, photo, upload

pytestmark = pytest.mark.slow  # two hundred jobs through two real workers

JOBS, CANCELLED = 200, 20


def test_two_hundred_jobs_each_end_in_exactly_one_terminal_state(stack, worker_env, run_log):
    from worker.app import make_app
    from worker.client import InpaintClient

    client = InpaintClient(make_app(stack.settings(queue="load")))
    workers = [stack.start_worker(f"load{i}@{socket.gethostname()}", INPAINT_QUEUE="load", **worker_env)
               for i in range(2)]
    try:
        for worker in workers:
            worker.wait_ready(client.app)
        request = {"prompt": "a date", "image": upload(stack, "load/photo.png", photo()),
                   "mask_image": upload(stack, "load/mask.png", box_mask()), "num_inference_steps": 2,
                   "strength": 1.0, "plugins": {"testkit": {"step_s": 0.02}}}
        rng = random.Random(7)
        jobs = [client.submit({**request, "seed": i}) for i in range(JOBS)]
        to_cancel = set(rng.sample(jobs, CANCELLED))
        deadline = time.monotonic() + 600
        pending = set(to_cancel)
        while pending:  # cancel at random moments: queued, running, or already done
            job_id = rng.choice(sorted(pending))
            client.cancel(job_id)
            pending.discard(job_id)
            time.sleep(rng.uniform(0, 0.3))
        statuses = {job_id: client.wait(job_id, timeout=max(1.0, deadline - time.monotonic())) for job_id in jobs}
    finally:
        for worker in workers:
            worker.stop()
    states = {job_id: (s.state, (s.error or {}).get("code")) for job_id, s in statuses.items()}
    assert all(state in {("SUCCESS", None), ("FAILURE", "cancelled")} for state in states.values()), \
        {k: v for k, v in states.items() if v not in {("SUCCESS", None), ("FAILURE", "cancelled")}}
    assert all(states[j] == ("SUCCESS", None) for j in jobs if j not in to_cancel)
    words = run_log.read_text().split()
    assert all(words.count(f"done:{j}") <= 1 for j in jobs)  # none ran twice to completion
    assert all(words.count(f"done:{j}") == 1 for j, s in states.items() if s[0] == "SUCCESS")
    waits = sorted(s.result.worker["queue_wait_s"] for s in statuses.values() if s.result)
    nodes = {s.result.worker["node"].split("@")[0] for s in statuses.values() if s.result}
    assert nodes == {"load0", "load1"}
    cancelled = sum(1 for s in states.values() if s[1] == "cancelled")
    print(f"\n{JOBS} jobs on 2 workers: {JOBS - cancelled} SUCCESS, {cancelled} cancelled "
          f"({CANCELLED} cancel requests); queue wait p50 {statistics.median(waits):.2f} s, "
          f"p95 {waits[int(0.95 * (len(waits) - 1))]:.2f} s")
