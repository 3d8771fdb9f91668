"""One thread pool for a job's network round trips (inputs fetched, outputs stored), so they overlap.

A long-lived pool: starting threads for each job cost more than the overlap saved.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="io")

# A job's deadline plus its margin (a time.monotonic() value), set while it runs: no retry of a round trip starts
# after it, so a stalled S3 cannot keep a job running past Redis's visibility timeout (which would hand it to a
# second worker). A try already in flight ends within its own timeouts.
retry_until: contextvars.ContextVar[float | None] = contextvars.ContextVar("retry_until", default=None)


def time_for_retry(wait_s: float) -> bool:
    """Whether a retry after `wait_s` seconds starts before the running job's stop (always, outside a job)."""
    stop = retry_until.get()
    return stop is None or time.monotonic() + wait_s < stop


def at_once(*calls: Callable[[], Any]) -> list[Future]:
    """Run the calls concurrently, each in a copy of the caller's context (its job id for logs); wait for all.

    The futures come back in the calls' order: `.result()` on each raises the first failure in that order.
    """
    futures = [_pool.submit(contextvars.copy_context().run, call) for call in calls]
    wait(futures)
    return futures

