"""What the worker needs of its Redis, checked when it starts: that Redis never evicts its keys.

With `maxmemory` set, any `maxmemory-policy` but `noeviction` lets Redis delete keys when memory runs short.
`allkeys-*` evicts queued jobs and the unacked copies of running ones (lost jobs, or kombu's
`InconsistencyError`); `volatile-*` evicts the keys that expire: job leases (a second copy of a running job
starts), submit claims (a retried submit enqueues the job twice), cancel flags and job outcomes. Nothing is
logged when that happens, so a worker refuses to start on such a Redis instead. `noeviction` makes a full Redis
refuse writes: a submit fails at once, loudly, and nothing already accepted is lost. A Redis that refuses CONFIG
(managed services rename or forbid it) cannot be checked: the worker says so and starts.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.app.backends import by_url
from celery.signals import worker_init

from . import logs
from .settings import get_settings

log = logging.getLogger(__name__)

FIX = ("set maxmemory-policy noeviction (redis.conf, or `CONFIG SET maxmemory-policy noeviction` and "
       "`CONFIG REWRITE`; on a managed service, its parameter group), or leave maxmemory unset (0)")


def eviction_risk(client: Any) -> str | None:
    """Why this Redis may evict the worker's keys, or None when it will not. Raises redis' errors (CONFIG refused,
    Redis away)."""
    config = {_text(key): _text(value) for key, value in client.config_get("maxmemory*").items()}
    maxmemory, policy = int(config.get("maxmemory", "0") or 0), config.get("maxmemory-policy", "noeviction")
    if maxmemory and policy != "noeviction":
        return (f"maxmemory is {maxmemory} bytes with maxmemory-policy {policy}: when memory runs short Redis "
                "deletes keys, and with them queued jobs, running jobs' leases or their outcomes")
    return None


def check_redis(client: Any, what: str) -> str | None:
    """`eviction_risk` of one Redis (`what`: which, for the log); None, logged, when it cannot be checked."""
    import redis.exceptions

    try:
        return eviction_risk(client)
    except redis.exceptions.ResponseError as error:  # NOPERM is one too
        log.warning("could not check that the %s Redis does not evict keys (it refused CONFIG GET: %s); make sure "
                    "its maxmemory-policy is noeviction", what, str(error)[:200])
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as error:
        log.warning("could not check that the %s Redis does not evict keys (%s: %s); the worker goes on and "
                    "connects when it can", what, type(error).__name__, str(error)[:200])
    return None


def redis_clients(app: Any, broker_url: str, backend_url: str) -> dict[str, Any]:
    """The result backend's client (leases, cancel flags and outcomes go there), and the broker's when it is
    another Redis; with Sentinel, clients of the current master."""
    clients = {"result backend": app.backend.client}
    if broker_url != backend_url:
        backend_cls, url = by_url(broker_url, app.loader)
        clients["broker"] = backend_cls(app=app, url=url).client
    return clients


@worker_init.connect
def refuse_an_evicting_redis(sender: Any = None, **_: Any) -> None:
    """Exit (1) before loading the model when the Redis the worker uses may evict its keys. Celery swallows what a
    signal handler raises, but not SystemExit."""
    app = getattr(sender, "app", None)
    if app is None:
        return
    settings = get_settings()
    logs.configure(settings.log_format, settings.log_level, libraries=())  # before Celery's setup_logging
    for what, client in redis_clients(app, settings.broker_url, settings.backend_url).items():
        risk = check_redis(client, what)
        if risk:
            log.critical("worker cannot start and exits: the %s Redis may lose jobs: %s. Fix: %s", what, risk, FIX)
            raise SystemExit(1)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
