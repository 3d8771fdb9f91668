"""A dead worker's job back in its queue within seconds: the job's lease lapsed, its message still unacked.

Redis hands a job's message to another worker only after the visibility timeout (an hour by default, longer
than the longest job), so a job whose worker was SIGKILLed, lost its GPU or its host would wait that long, its
progress frozen. Every job holds a lease while it runs (worker/lease.py), renewed every few seconds: a message
unacked for longer than a lease whose job holds no lease has no live worker. Each worker sweeps for such messages
every `SWEEP_S` and puts them back at the front of their queue the way kombu restores unacked messages (under
kombu's `unacked_mutex`, one watched transaction per message), once. The worker that takes the message again
drops it if the job ended (its ack was lost) and ends it as `cancelled` if a cancel was asked for; only a job that
neither ended nor was cancelled runs again. The visibility timeout stays as the last backstop.

A worker that is alive but slow keeps renewing its lease and is never swept, nor is a copy waiting for it; one frozen
for longer than a lease (SIGSTOP, a stalled host) finds its lease lapsed when it wakes and ends without writing an
outcome, its message rejected back to the queue if the sweep has not put it back (worker/tasks.py).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from typing import Any

from kombu.transport.redis import Mutex, MutexHeld

from .protocol import LEASE_S, TASK_NAME, lease_key, store_progress, waiting_copy_key
from .queues import mark_waiting

log = logging.getLogger(__name__)
SWEEP_S = 5.0  # with LEASE_S, a dead worker's job is back in its queue 10 to 20 s after the worker died


def requeue_orphans(app: Any, now: float | None = None) -> list[str]:
    """Put back in their queues the jobs whose messages are unacked and whose leases lapsed; their ids."""
    now = time.time() if now is None else now
    requeued = []
    backend = app.backend.client
    with app.connection_for_write() as connection, connection.default_channel.conn_or_acquire() as client:
        channel = connection.default_channel
        try:
            with Mutex(client, channel.qos.unacked_mutex_key, channel.qos.unacked_mutex_expire):
                # delivered over a lease ago: a fresh delivery's worker takes the lease at once
                for tag in client.zrangebyscore(channel.qos.unacked_index_key, "-inf", now - LEASE_S):
                    raw = client.hget(channel.qos.unacked_key, tag)
                    payload = json.loads(raw)[0] if raw else {}
                    job_id = inpaint_job_id(payload)
                    if job_id is None or backend.exists(lease_key(job_id), waiting_copy_key(job_id)):
                        continue  # not a job, running, or a copy waiting for the worker that runs it
                    store_progress(app.backend, job_id, {"stage": "requeued"})  # before another worker starts it
                    if restore_with_new_tag(channel, client, tag):
                        requeued.append(job_id)
                        mark_waiting(backend, *queue_and_priority(payload), job_id, front=True)
        except MutexHeld:  # another worker (or kombu's own restore) is sweeping now
            return []
    for job_id in requeued:
        log.warning("job %s: its worker died (no lease for %d s): put back at the front of its queue", job_id,
                    LEASE_S)
    return requeued


def restore_with_new_tag(channel: Any, client: Any, tag: str) -> bool:
    """kombu's `restore_by_tag` (one watched transaction: never twice), but the message goes back under a new
    delivery tag: the dead (or frozen) worker's tag then names nothing, so its late ack cannot remove the next
    holder's record of the job (kombu keeps a message's tag across restores)."""
    restored = []

    def transaction(pipe: Any) -> None:
        raw = pipe.hget(channel.qos.unacked_key, tag)
        pipe.multi()
        channel.qos._remove_from_indices(tag, pipe)
        restored.clear()
        if raw:
            payload, exchange, routing_key = json.loads(raw)
            payload["properties"]["delivery_tag"] = uuid.uuid4().hex
            channel._do_restore_message(payload, exchange, routing_key, pipe)
            restored.append(tag)

    client.transaction(transaction, channel.qos.unacked_key)
    return bool(restored)


def queue_and_priority(payload: dict) -> tuple[str, int]:
    properties = payload.get("properties") or {}
    priority = properties.get("priority")
    return ((properties.get("delivery_info") or {}).get("routing_key") or "celery",
            priority if isinstance(priority, int) and not isinstance(priority, bool) else 0)


def inpaint_job_id(payload: dict) -> str | None:
    """The job id of an `inpaint` message (protocol 2: in its headers; protocol 1: in its body), else None."""
    headers = payload.get("headers") or {}
    if headers.get("task") == TASK_NAME:
        return headers.get("id")
    if headers.get("task") is None:  # protocol 1: the task's name and id are in the (JSON, base64) body
        encoding = (payload.get("properties") or {}).get("body_encoding")
        try:
            body = json.loads(base64.b64decode(payload["body"]) if encoding == "base64" else payload["body"])
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
