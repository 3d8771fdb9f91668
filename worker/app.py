"""The Celery app and its configuration: settings for long GPU jobs that must be neither lost nor run twice."""

from __future__ import annotations

from celery import Celery
from celery.signals import setup_logging

from . import logs
from .queues import PRIORITY_STEPS
from .settings import Settings, get_settings

UNACKED_MUTEX_EXPIRE_S = 30
CONNECT_TIMEOUT_S = 5.0  # bounds a connect to a Redis host that does not answer (workers and clients)
CLIENT_SOCKET_TIMEOUT_S = 15.0  # bounds a client's wait for one Redis reply (Celery's default: 120 s)
CLIENT_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.3, "interval_max": 0.5}


def make_app(settings: Settings, client: bool = False) -> Celery:
    """The app workers run (`client=False`), or one for web backends that fails fast when Redis is away.

    A worker keeps trying to store an outcome through a Redis restart (a job's result must not be
    lost); a client that did the same would hang a web request for minutes (`status` took 95 s).
    """
    # the task module (which needs torch) is imported by workers only, never by clients; redis_policy first: its
    # check at start runs before the model loads
    app = Celery("inpaint_worker", broker=settings.broker_url, backend=settings.backend_url,
                 include=["worker.redis_policy", "worker.tasks"],
                 events=None if client else "worker.lease:CopyAwareEvents")
    app.conf.update(
        # JSON only: a pickled message is refused before anything is executed
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # a job is acked when it ends, and handed to another worker if its worker dies
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # STARTED is stored by the task once it holds the job's lease (worker/lease.py): Celery's own, stored
        # before the task runs, would overwrite the outcome of a job delivered again after it ended
        task_track_started=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
        # not result_extended: it would keep the whole request (megabytes of data: URLs, signed URLs, webhook
        # tokens) in the task state for result_expires_s, and send it again with every status poll
        result_expires=settings.result_expires_s,
        task_default_queue=settings.queue,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # must exceed the longest job (checked in Settings), or Redis redelivers a running job
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.unacked_restore_interval_s,
            "unacked_restore_throttle": settings.unacked_restore_throttle,
            # a worker killed during a sweep leaves its lock behind: kombu's default (300 s) would hold back every
            # redelivery that long; a sweep takes milliseconds, and two at once cannot deliver a job twice
            "unacked_mutex_expire": UNACKED_MUTEX_EXPIRE_S,
            # a host that drops packets would otherwise hold a connect for the kernel's ~2 minutes of SYN retries
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            # a job's priority (0 the most urgent) picks its list: worker/queues.py (several queues: round robin)
            "priority_steps": list(PRIORITY_STEPS),
            **settings.redis_transport_options(settings.broker_url),  # Sentinel: the master's name, their password
        },
        redis_socket_connect_timeout=CONNECT_TIMEOUT_S,
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s,
                                          **settings.redis_transport_options(settings.backend_url)},
        # a Redis restart during a job must not lose its outcome: keep trying to store it
        result_backend_always_retry=not client,
        result_backend_max_retries=30,
        worker_hijack_root_logger=False,
    )
    if client:
        app.conf.update(
            # a lost connection while waiting on a job's pub/sub channel: a few quick tries, then an error
            result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s,
                                              "retry_policy": CLIENT_RETRY_POLICY,
                                              **settings.redis_transport_options(settings.backend_url)},
            task_publish_retry_policy=CLIENT_RETRY_POLICY,
            redis_socket_timeout=CLIENT_SOCKET_TIMEOUT_S,
            # a broker that takes the connection and never answers would hold a submit forever (kombu: no timeout)
            broker_transport_options={**app.conf.broker_transport_options, "socket_timeout": CLIENT_SOCKET_TIMEOUT_S},
        )
    return app


def __getattr__(name: str) -> Celery:
    """`app`, the workers' app (`celery -A worker.app`), made from the environment when first asked for: importing
    this module, as clients do for `make_app`, reads no setting."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()["app"] = made = make_app(get_settings())
    return made


@setup_logging.connect
def configure_worker_logging(**_: object) -> None:
    """Our format (text or JSON, the job id on every line) instead of Celery's."""
    settings = get_settings()
    logs.configure(settings.log_format, settings.log_level)
