"""One copy of a job runs at a time: a lease in Redis, held while the job runs and renewed by a thread.

Redis can hand out a running job a second time: when a worker's broker connection drops, kombu puts
the job's message back in the queue at once, and the threads pool cannot stop the copy already
running. The copy that finds the lease taken waits for the holder to end instead of running too.
A holder that dies stops renewing, so its lease lapses within `LEASE_S` and the job runs again.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import uuid
from typing import Any

from .protocol import LEASE_S, RELEASE_LEASE, RENEW_LEASE, lease_key

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
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._renew_loop,),  # the job id
                                        name=f"lease-{self.job_id[:8]}", daemon=True)  # on its log lines
        self._thread.start()
        return True

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
                    log.error("job %s: another worker took its lease (Redis was away longer than %d s); "
                              "two copies may be running", self.job_id, LEASE_S)
                    return
            except Exception as error:  # Redis away for a moment: try again at the next renewal
                log.warning("could not renew the lease of job %s: %s", self.job_id, error)
