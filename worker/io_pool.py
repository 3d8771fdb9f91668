"""One thread pool for a job's network round trips (inputs fetched, outputs stored), so they overlap.

A long-lived pool: starting threads for each job cost more than the overlap saved.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="io")

def at_once(*calls: Callable[[], Any]) -> list[Future]:
    """Run the calls concurrently, each in a copy of the caller's context (its job id for logs); wait for all.

    The futures come back in the calls' order: `.result()` on each raises the first failure in that order.
    """
    futures = [_pool.submit(contextvars.copy_context().run, call) for call in calls]
    wait(futures)
    return futures

