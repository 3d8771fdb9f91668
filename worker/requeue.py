"""A dead worker's job back in its queue within seconds: the job's lease lapsed, its message still unacked.

Redis hands a job's message to another worker only after the visibility timeout (an hour by default, longer
than the longest job), so a job whose worker was SIGKILLed, lost its GPU or its host would wait that long, its
progress frozen. Every job holds a lease while it runs (worker/lease.py), renewed every few seconds: a message
unacked for longer than a lease whose job holds no lease has no live worker. Each worker sweeps for such messages
every `SWEEP_S` and puts them back at the front of their queue the way kombu restores unacked messages (under
kombu's `unacked_mutex`, one watched transaction per message), once. The worker that takes the message again
drops it if the job ended (its ack was lost) and ends it as `cancelled` if a cancel was asked for; only a job that
neither ended nor was cancelled runs again. The visibility timeout stays as the last backstop.

A worker that is alive but slow keeps renewing its lease and is never swept; one frozen for longer than a lease
(SIGSTOP, a stalled host) finds the lease taken when it wakes and ends without writing an outcome (worker/tasks.py).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from typing import Any

from kombu.transport.redis import Mutex, MutexHeld

from .protocol import LEASE_S, TASK_NAME, lease_key, store_progress

log = logging.getLogger(__name__)
SWEEP_S = 5.0  # with LEASE_S, a dead worker's job is back in its queue 15 to 20 s after the worker died


def requeue_orphans(app: Any, now: float | None = None) -> list[str]:
    """Put back in their queues the jobs whose messages are unacked and whose leases lapsed; their ids."""
    now = time.time() if now is None else now
    requeued = []
    with app.connection_for_write() as connection, connection.default_channel.conn_or_acquire() as client:
        qos = connection.default_channel.qos
        try:
            with Mutex(client, qos.unacked_mutex_key, qos.unacked_mutex_expire):
                for tag, raw in client.hgetall(qos.unacked_key).items():
                    delivered = client.zscore(qos.unacked_index_key, tag)
                    job_id = inpaint_job_id(json.loads(raw)[0])
                    if job_id is None or delivered is None or now - delivered < LEASE_S:
                        continue  # not a job, or just delivered: its worker takes the lease at once
                    if app.backend.client.exists(lease_key(job_id)):
                        continue  # running, or a copy waiting for the worker that runs it
                    qos.restore_by_tag(tag, client)
                    requeued.append(job_id)
        except MutexHeld:  # another worker (or kombu's own restore) is sweeping now
            return []
    for job_id in requeued:
        log.warning("job %s: its worker died (no lease for %d s): put back at the front of its queue", job_id,
                    LEASE_S)
        store_progress(app.backend, job_id, {"stage": "requeued"})
    return requeued


def give_back(app: Any, delivery_tag: str | None) -> bool:
    """Put a message this worker holds back at the front of its queue (a worker that lost its job's lease gives
    the job up): what the sweep would do, at once. False when it is no longer unacked (the sweep put it back)."""
    if delivery_tag is None:
        return False
    with app.connection_for_write() as connection, connection.default_channel.conn_or_acquire() as client:
        qos = connection.default_channel.qos
        held = client.hexists(qos.unacked_key, delivery_tag)
        qos.restore_by_tag(delivery_tag, client)  # one watched transaction: never twice
    return bool(held)


def inpaint_job_id(payload: dict) -> str | None:
    """The job id of an `inpaint` message (protocol 2: in its headers; protocol 1: in its body), else None."""
    headers = payload.get("headers") or {}
    if headers.get("task") == TASK_NAME:
        return headers.get("id")
    if headers.get("task") is None:  # protocol 1: the task's name and id are in the (JSON, base64) body
        try:
            body = json.loads(base64.b64decode(payload["body"]) if payload.get("body_encoding") == "base64"
                              else payload["body"])
        except (KeyError, TypeError, ValueError):
            return None
        if isinstance(body, dict) and body.get("task") == TASK_NAME:
            return body.get("id")
    return None


class Sweeper:
    """A worker's thread that requeues dead workers' jobs every `SWEEP_S`; Redis away is a round skipped."""

    def __init__(self, app: Any):
        self.app = app
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="requeue-sweeper", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(SWEEP_S):
            try:
                requeue_orphans(self.app)
            except Exception as error:
                log.warning("could not sweep for dead workers' jobs: %s", error)
