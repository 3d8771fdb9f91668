"""Webhook: POST a small signed JSON summary of each finished or failed job to a URL the request names.

The URL's host must be on the operator's allow-list (`INPAINT_WEBHOOK_ALLOW`); a job's
`plugins.webhook` options are checked at job start, so a host that is not allowed makes the
job an `invalid_request` before anything runs. Delivery runs in a background (non-daemon)
thread: the job never waits for it, never fails because of it, and the process waits for
pending deliveries when it exits. Non-2xx answers and connection errors are retried with
exponential backoff; redirects are never followed (they could leave the allow-list).

Environment: INPAINT_WEBHOOK_ALLOW, INPAINT_WEBHOOK_SECRET, INPAINT_WEBHOOK_ATTEMPTS (1-10),
INPAINT_WEBHOOK_BACKOFF_S (0-30), INPAINT_WEBHOOK_TIMEOUT_S (0.001-30) (see README.md). The numbers
are checked when the plugin loads: one out of bounds fails the load with an error naming it.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.hooks import hookimpl
from worker.redaction import redacted_reference as redact  # URLs in logs: no query, no user:password@

NAME = "webhook"
USER_AGENT = "inpaint-webhook/0.1"
ENV_ALLOW = "INPAINT_WEBHOOK_ALLOW"
ENV_SECRET = "INPAINT_WEBHOOK_SECRET"
ENV_ATTEMPTS = "INPAINT_WEBHOOK_ATTEMPTS"
ENV_BACKOFF = "INPAINT_WEBHOOK_BACKOFF_S"
ENV_TIMEOUT = "INPAINT_WEBHOOK_TIMEOUT_S"
EVENTS = ("finished", "failed")
# A plain host[:port] (no user info, no escapes) so that every URL parser reads the same host.
NETLOC = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")

log = logging.getLogger("inpaint_webhook")

_deliveries: list[threading.Thread] = []  # threads started and maybe still running; tests join them
_lock = threading.Lock()
_warned_unsigned = False


def check_settings() -> Settings:
    """Validate the operator's delivery settings now (the plugin calls it when it loads): a bad one is a
    ValueError naming its variable, so the worker reports the plugin as failed instead of retrying without end."""
    return Settings.from_env()


def allowed_hosts() -> set[str]:
    """The hostnames in INPAINT_WEBHOOK_ALLOW (comma-separated, case-insensitive; a port given is ignored)."""
    hosts = set()
    for entry in os.environ.get(ENV_ALLOW, "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        try:
            host = urlsplit(entry if "//" in entry else f"//{entry}").hostname
        except ValueError:
            host = None
        if host:
            hosts.add(host.rstrip("."))
    return hosts


def check_url(url: str) -> str:
    """The URL if it is http(s) to a host on the allow-list; a ValueError a person can act on otherwise."""
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError("must not contain spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http"):
        raise ValueError("must start with https:// or http://")
    if not parts.netloc:
        raise ValueError("has no host")
    if not NETLOC.match(parts.netloc):
        raise ValueError("the host part must be a plain host[:port] (no user info, no escapes)")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise ValueError("has an invalid port") from None
    host = (parts.hostname or "").rstrip(".")
    allowed = allowed_hosts()
    if not allowed:
        raise ValueError(f"host {host!r} is not allowed: {ENV_ALLOW} is empty on this worker, so no webhook "
                         "host is allowed")
    if host not in allowed:
        raise ValueError(f"host {host!r} is not on this worker's webhook allow-list ({ENV_ALLOW})")
    return url


class Options(BaseModel):
    """A job's `plugins.webhook` object. Without a `url` the plugin sends nothing."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(
        None, max_length=2048,
        description="http(s) URL to POST the summary to; its host must be listed in INPAINT_WEBHOOK_ALLOW",
    )
    events: list[Literal["finished", "failed"]] = Field(
        default_factory=lambda: list(EVENTS), min_length=1, description="Which job endings to report"
    )

    @field_validator("url")
    @classmethod
    def _allowed(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value)


# Bounds of the operator's numbers: a delivery that keeps failing ends within
# attempts x timeout + the waits between attempts (each at most MAX_WAIT_S): 10 x 30 + 9 x 60 = 840 s at worst.
ATTEMPTS_RANGE = (1, 10)
BACKOFF_RANGE_S = (0.0, 30.0)
TIMEOUT_RANGE_S = (0.001, 30.0)
MAX_WAIT_S = 60.0


@dataclass(frozen=True)
class Settings:
    """Delivery settings, each bounded (a ValueError names the variable of one out of bounds)."""

    attempts: int = 4
    backoff_s: float = 0.5
    timeout_s: float = 5.0
    secret: bytes | None = field(default=None, repr=False)  # never in logs

    def __post_init__(self) -> None:
        for name, value, (low, high) in ((ENV_ATTEMPTS, self.attempts, ATTEMPTS_RANGE),
                                         (ENV_BACKOFF, self.backoff_s, BACKOFF_RANGE_S),
                                         (ENV_TIMEOUT, self.timeout_s, TIMEOUT_RANGE_S)):
            if not low <= value <= high:  # NaN fails too
                raise ValueError(f"{name}={value!r} is out of bounds: it must be between {low:g} and {high:g}")

    @classmethod
    def from_env(cls) -> Settings:
        """The settings from the environment; a ValueError naming the variable if one is not a number in bounds."""
        secret = os.environ.get(ENV_SECRET) or None
        return cls(
            attempts=int(_env_number(ENV_ATTEMPTS, cls.attempts, int, ATTEMPTS_RANGE)),
            backoff_s=_env_number(ENV_BACKOFF, cls.backoff_s, float, BACKOFF_RANGE_S),
            timeout_s=_env_number(ENV_TIMEOUT, cls.timeout_s, float, TIMEOUT_RANGE_S),
            secret=secret.encode() if secret else None,
        )

    def wait_s(self, attempt: int) -> float:
        """The wait after failed attempt `attempt` (1, 2, ...): the backoff doubling each time, at most MAX_WAIT_S."""
        return min(MAX_WAIT_S, self.backoff_s * 2.0 ** min(attempt - 1, 64))


def _env_number(name: str, default: float, cast: type, bounds: tuple[float, float]) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    low, high = bounds
    try:
        value = cast(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:  # NaN fails too
        kind = "a whole number" if cast is int else "a number"
        raise ValueError(f"{name}={raw!r} is not valid: it must be {kind} between {low:g} and {high:g}")
    return value


def sign(secret: bytes | str, timestamp: int | str, body: bytes) -> str:
    """The X-Inpaint-Signature value: `sha256=` and the hex HMAC-SHA256 of `<timestamp>.` + body."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(secret: bytes | str, timestamp: int | str | None, body: bytes, header: str | None, *,
                     max_age_s: float | None = None, now: float | None = None) -> bool:
    """For receivers: whether `header` (X-Inpaint-Signature) signs `body` sent at `timestamp` (X-Inpaint-Timestamp).

    With `max_age_s`, a timestamp further than that from now is refused too (replays).
    """
    if not secret or timestamp is None or not header:
        return False
    timestamp = str(timestamp).strip()
    if not timestamp.isdigit() or not timestamp.isascii():
        return False
    if max_age_s is not None and abs((time.time() if now is None else now) - int(timestamp)) > max_age_s:
        return False
    expected = sign(secret, timestamp, body).encode()
    return hmac.compare_digest(expected, header.strip().encode("utf-8", "replace"))


def summary(job_id: str, state: Literal["SUCCESS", "FAILURE"], *, error: Any = None, images: Any = (),
            timings: dict[str, float] | None = None) -> dict[str, Any]:
    """The JSON summary, less `sent_at` (set at each attempt)."""
    return {
        "job_id": str(job_id),
        "state": state,
        "error": None if error is None else {
            "code": str(getattr(error, "code", "internal")),
            "message": str(getattr(error, "message", error)),
        },
        "images": [
            {"index": getattr(image, "index", None), "url": getattr(image, "url", None),
             "location": getattr(image, "location", None)}
            for image in images or ()
        ],
        "timings": dict(timings or {}),
    }


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse every redirect: urllib then raises HTTPError with the 3xx code."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        return None


def deliver(url: str, payload: dict[str, Any], settings: Settings, job_id: str = "") -> bool:
    """POST `payload` to `url`, retrying; True once a 2xx answer came. Never raises."""
    global _warned_unsigned
    if settings.secret is None:
        with _lock:
            warn, _warned_unsigned = not _warned_unsigned, True
        if warn:
            log.warning("%s is not set: webhooks are sent unsigned", ENV_SECRET)
    opener = urllib.request.build_opener(_NoRedirect)
    problem = "not attempted"
    for attempt in range(1, settings.attempts + 1):
        try:
            timestamp = int(time.time())
            body = json.dumps({**payload, "sent_at": timestamp}, separators=(",", ":")).encode()
            headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                       "X-Inpaint-Timestamp": str(timestamp)}
            if settings.secret is not None:
                headers["X-Inpaint-Signature"] = sign(settings.secret, timestamp, body)
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with opener.open(request, timeout=settings.timeout_s) as response:
                status = response.status
            if 200 <= status < 300:
                log.info("webhook for job %s delivered to %s (HTTP %s, attempt %d)", job_id, redact(url), status,
                         attempt)
                return True
            problem = f"HTTP {status}"
        except urllib.error.HTTPError as error:
            problem = f"HTTP {error.code}" + (" (redirect not followed)" if 300 <= error.code < 400 else "")
            error.close()
        except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, refused, reset
            problem = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
        except Exception as error:  # never let anything escape the delivery thread
            problem = f"{type(error).__name__}: {error}"
        if attempt < settings.attempts:
            delay = settings.wait_s(attempt)
            log.debug("webhook for job %s to %s: %s; attempt %d of %d, retrying in %.2f s", job_id, redact(url),
                      problem, attempt, settings.attempts, delay)
            time.sleep(delay)
    log.error("webhook for job %s to %s failed after %d attempts: %s", job_id, redact(url), settings.attempts,
              problem)
    return False


def _run(url: str, payload: dict[str, Any], settings: Settings, job_id: str) -> None:
    try:
        deliver(url, payload, settings, job_id)
    except BaseException:  # pragma: no cover - deliver() catches everything it expects
        log.exception("webhook delivery for job %s crashed", job_id)


def send(url: str, payload: dict[str, Any], job_id: str = "", settings: Settings | None = None) -> threading.Thread:
    """Start delivering in a non-daemon thread (the process waits for it at exit) and return the thread."""
    thread = threading.Thread(target=_run, args=(url, payload, settings or Settings.from_env(), job_id),
                              name=f"inpaint-webhook-{job_id}", daemon=False)
    with _lock:
        _deliveries[:] = [t for t in _deliveries if t.is_alive()]
        _deliveries.append(thread)
    thread.start()
    return thread


def wait_for_deliveries(timeout: float | None = None) -> bool:
    """Join the delivery threads started so far (all within `timeout` seconds); True if none is left running."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with _lock:
        threads = list(_deliveries)
    for thread in threads:
        thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return not any(thread.is_alive() for thread in threads)


def job_options(job: Any) -> Options:
    options = job.options(NAME)
    if isinstance(options, Options):
        return options
    return Options.model_validate(options if isinstance(options, dict) else {})


def _notify(job: Any, event: str, make_payload: Any) -> None:
    job_id = getattr(job, "id", "")
    try:
        options = job_options(job)
        if options.url is None or event not in options.events:
            return
        send(options.url, make_payload(), job_id=job_id)
    except Exception:  # a webhook never fails the job
        log.exception("webhook for job %s not sent", job_id)


@hookimpl
def inpaint_job_finished(job: Any, result: Any) -> None:
    _notify(job, "finished", lambda: summary(job.id, "SUCCESS", images=getattr(result, "images", ()),
                                             timings=getattr(result, "timings", None)))


@hookimpl
def inpaint_job_failed(job: Any, error: Any) -> None:
    _notify(job, "failed", lambda: summary(job.id, "FAILURE", error=error))


check_settings()  # when the plugin loads: a bad INPAINT_WEBHOOK_ATTEMPTS, _BACKOFF_S or _TIMEOUT_S fails the load
