"""Storage round trips tried again after passing trouble, with backoff, and never past the running job's deadline
plus its margin."""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from .errors import StorageError
from .settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# A job's deadline plus its margin (a time.monotonic() value), set while it runs: no retry of a round trip starts
# after it, so a stalled S3 cannot keep a job running past Redis's visibility timeout (which would hand it to a
# second worker). A try already in flight ends within its own timeouts.
retry_until: contextvars.ContextVar[float | None] = contextvars.ContextVar("retry_until", default=None)


def time_for_retry(wait_s: float) -> bool:
    """Whether a retry after `wait_s` seconds starts before the running job's stop (always, outside a job)."""
    stop = retry_until.get()
    return stop is None or time.monotonic() + wait_s < stop


def with_retries(settings: Settings, what: str, call: Callable[[], T], trouble: Callable[[Exception], str | None],
                 field: str | None = None, until: float | None = None) -> T:
    """Run a storage call, retrying what `trouble` names (None: not worth another try) with exponential backoff,
    `INPAINT_STORAGE_ATTEMPTS` times at most, never past the running job's `retry_until` nor `until` (a monotonic
    time)."""
    wait = settings.storage_backoff_s
    for attempt in range(1, settings.storage_attempts + 1):
        try:
            return call()
        except Exception as error:
            problem = trouble(error)
            if problem is None:
                raise
        failed = f"{what} failed after {attempt} {'try' if attempt == 1 else 'tries'}: {problem}"
        if attempt == settings.storage_attempts:
            raise StorageError(failed, field=field)
        if not time_for_retry(wait):
            raise StorageError(f"{failed}; no time left for another before the job's deadline (and "
                               "INPAINT_DEADLINE_MARGIN_S)", field=field)
        if until is not None and time.monotonic() + wait >= until:
            raise StorageError(f"{failed}; no time left for another", field=field)
        log.warning("%s failed (%s); try %d of %d in %.1f s", what, problem, attempt + 1, settings.storage_attempts,
                    wait)
        time.sleep(wait)
        wait *= 2
    raise AssertionError("unreachable")
