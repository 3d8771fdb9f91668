"""One copy of a job runs at a time: a lease in Redis, held while the job runs and renewed by a thread.

Redis can hand out a running job a second time: when a worker's broker connection drops, kombu puts
the job's message back in the queue at once, and the threads pool cannot stop the copy already
running. The copy that finds the lease taken waits for the holder to end instead of running too.
A holder that dies stops renewing, so its lease lapses within `LEASE_S` and the job runs again.

A copy sends no task events (`CopyAwareEvents`, `copy_received`): Flower would take its received and started
times for the job's, and count it as one more job processed.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import uuid
from typing import Any

from celery.app.events import Events
from celery.events.dispatcher import EventDispatcher

from .protocol import LEASE_S, RELEASE_LEASE, RENEW_LEASE, TERMINAL, lease_key

log = logging.getLogger(__name__)
RENEW_EVERY_S = 5

class JobLease:
    """`acquire` once; while held, a thread renews it every `RENEW_EVERY_S`; `release` ends it."""

    def __init__(self, redis: Any, job_id: str, holder: str):
        self.redis, self.job_id, self.key = redis, job_id, lease_key(job_id)
        self.token = f"{holder}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self.redis.set(self.key, self.token, nx=True, px=LEASE_S * 1000):
            return False
        self._start_renewing()
        return True

    def _start_renewing(self) -> None:
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._renew_loop,),  # the job id
                                        name=f"lease-{self.job_id[:8]}", daemon=True)  # on its log lines
        self._thread.start()

    def take_over(self) -> None:
        """Hold the lease whoever held it (a holder that ran past the visibility timeout is taken to be stuck)."""
        self.redis.set(self.key, self.token, px=LEASE_S * 1000)
        self._start_renewing()

    def taken(self) -> bool:
        """Whether this worker lost the lease: it was frozen, or cut off from Redis, for longer than LEASE_S,
        and the job may have been put back in its queue (worker/requeue.py) and run by another. Redis away: not
        known to be lost."""
        try:
            held = self.redis.get(self.key)
        except Exception:
            return False
        return (held.decode() if isinstance(held, bytes) else held) != self.token

    def holder(self) -> str | None:
        """Who holds the lease now (a worker's node name and a token), or None."""
        held = self.redis.get(self.key)
        return held.decode() if isinstance(held, bytes) else held

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            self.redis.eval(RELEASE_LEASE, 1, self.key, self.token)
        except Exception as error:  # it lapses within LEASE_S
            log.warning("could not release the lease of job %s: %s", self.job_id, error)

    def _renew_loop(self) -> None:
        while not self._stop.wait(RENEW_EVERY_S):
            try:
                if not self.redis.eval(RENEW_LEASE, 1, self.key, self.token, LEASE_S * 1000):
                    log.error("job %s: its lease lapsed (this worker was frozen, or cut off from Redis, for %d s): "
                              "the job stops at its next step and goes back to the queue", self.job_id, LEASE_S)
                    return
            except Exception as error:  # Redis away for a moment: try again at the next renewal
                log.warning("could not renew the lease of job %s: %s", self.job_id, error)


# job ids whose next task-received event is a copy's: Celery sends it right after the task_received signal, from the
# same thread, through the consumer's dispatcher
_silenced_receipts: set[str] = set()


def copy_received(app: Any, job_id: str) -> bool:
    """Whether a message just received is a copy of a job that ended or runs elsewhere (its outcome stored, or its
    lease held); its task-received event is not sent. Redis away: not a copy (the task's own checks still hold)."""
    backend = app.backend
    try:
        with backend.client.pipeline(transaction=False) as pipe:
            meta, held = pipe.get(backend.get_key_for_task(job_id)).exists(lease_key(job_id)).execute()
        state = backend.decode(meta)["status"] if meta else None
    except Exception as error:
        log.warning("could not tell whether job %s is a copy: %s", job_id, error)
        return False
    if state in TERMINAL or held:
        _silenced_receipts.add(job_id)
        return True
    return False


class CopyAwareDispatcher(EventDispatcher):
    def send(self, type: str, *args: Any, **fields: Any) -> Any:
        if type == "task-received" and fields.get("uuid") in _silenced_receipts:
            _silenced_receipts.discard(fields["uuid"])
            return None
        return super().send(type, *args, **fields)


class CopyAwareEvents(Events):
    """The workers' events: a copy's task-received event is dropped (see `copy_received`)."""

    dispatcher_cls = "worker.lease:CopyAwareDispatcher"
