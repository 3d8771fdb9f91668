"""INPAINT_* settings as an operator gives them: values that would break the service are refused when
`inpaint-worker launch` starts, by variable name and what is allowed; every working configuration still starts."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from worker.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "S3CRETPASS-9d2"


def launch(**env: str) -> tuple[int, str]:
    """`inpaint-worker launch --cpu-workers 1` with these INPAINT_* settings only: its exit status and stderr.

    A setting it accepts starts a worker and supervises it until stopped: that shows as a timeout."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("INPAINT_")}
    process = subprocess.Popen([sys.executable, "-m", "worker.cli", "launch", "--cpu-workers", "1"], cwd=ROOT,
                               env={**clean, "CUDA_VISIBLE_DEVICES": "", **env}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and the worker it started
        _, err = process.communicate()
        pytest.fail(f"launch accepted {env} and went on running workers: {err[-2000:]}")
    return process.returncode, err


FINITE = "Input should be a finite number"
SCHEMES = "must be a Redis URL starting with redis://, rediss://, redis+socket://, not one with"


@pytest.mark.parametrize(("name", "value", "says"), [
    pytest.param("INPAINT_LOG_LEVEL", "verbose", "'verbose' is not a log level: use DEBUG, INFO, WARNING, ERROR, "
                 "CRITICAL (in any case)", id="log-level"),
    # an infinite visibility timeout: kombu would never hand a dead worker's job to another worker
    pytest.param("INPAINT_VISIBILITY_TIMEOUT_S", "inf", FINITE, id="visibility-inf"),
    pytest.param("INPAINT_MAX_DEADLINE_S", "nan", FINITE, id="deadline-nan"),
    pytest.param("INPAINT_DEADLINE_MARGIN_S", "inf", FINITE, id="margin-inf"),
    pytest.param("INPAINT_UNACKED_RESTORE_INTERVAL_S", "inf", FINITE, id="restore-interval-inf"),
    pytest.param("INPAINT_STORAGE_BACKOFF_S", "Infinity", FINITE, id="storage-backoff-inf"),
    pytest.param("INPAINT_PROGRESS_INTERVAL_S", "inf", FINITE, id="progress-interval-inf"),
    pytest.param("INPAINT_STEP_CACHE", "inf", FINITE, id="step-cache-inf"),
    pytest.param("INPAINT_QUEUE", "", "must be a queue name matching", id="queue-empty"),
    pytest.param("INPAINT_QUEUE", "jobs,urgent", "must be a queue name matching",
                 id="queue-two-names"),
    pytest.param("INPAINT_BROKER_URL", f"amqp://inpaint:{PASSWORD}@rabbit:5672//", f"{SCHEMES} scheme amqp://",
                 id="broker-amqp"),
    pytest.param("INPAINT_BROKER_URL", f"{PASSWORD}@localhost:6379/0", f"{SCHEMES} no scheme", id="broker-no-scheme"),
    pytest.param("INPAINT_RESULT_BACKEND", f"unix:///run/redis.sock?password={PASSWORD}",
                 f"{SCHEMES} scheme unix:// (a Unix socket: redis+socket:///path/to/redis.sock)", id="backend-unix"),
    # Celery's Redis client refuses it in every call (a bare ValueError), the worker's and every client's
    pytest.param("INPAINT_BROKER_URL", f"rediss://:{PASSWORD}@redis.example.com:6380/0",
                 "a rediss:// URL needs ?ssl_cert_reqs=required (or optional, or none", id="rediss-no-cert-reqs"),
    pytest.param("INPAINT_RESULT_BACKEND", "rediss://redis.example.com:6380/0?ssl_cert_reqs=REQUIRED",  # Celery:
                 "a rediss:// URL needs ?ssl_cert_reqs=required", id="rediss-cert-reqs-spelt-otherwise"),  # no
    # boto3 refuses it when the worker starts: every worker would exit and be restarted, again and again
    pytest.param("INPAINT_S3_ENDPOINT_URL", "minio:9000", "must be an http:// or https:// URL", id="s3-no-scheme"),
    # S3 refuses every URL signed for longer than 7 days: jobs would succeed with result URLs that never work
    pytest.param("INPAINT_PRESIGN_EXPIRY_S", "1209600", "Input should be less than or equal to 604800",
                 id="presign-over-7-days"),
])
def test_launch_refuses_a_setting_that_would_break_the_service_by_name_and_without_echoing_a_password(name, value,
                                                                                                       says):
    code, err = launch(**{name: value})
    assert code == 2, err
    assert f"{name}: {says}" in err, err
    assert "started worker" not in err and PASSWORD not in err, err


@pytest.mark.parametrize("given", ["debug", "Warning", " info ", "ERROR"])
def test_a_log_level_in_any_case_is_the_level_the_worker_logs_at(monkeypatch, given):
    from worker.app import configure_worker_logging  # what Celery calls when a worker starts (setup_logging)

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setenv("INPAINT_LOG_LEVEL", given)
    get_settings.cache_clear()
    try:
        configure_worker_logging()
        assert root.level == logging.getLevelName(given.strip().upper())
    finally:
        get_settings.cache_clear()
        root.handlers[:], root.level = handlers, level


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", f"redis://:{PASSWORD}@10.0.0.5:6379/0",
                                 f"rediss://:{PASSWORD}@redis.example.com:6380/1?ssl_cert_reqs=required",
                                 "rediss://redis.example.com:6380/1?ssl_cert_reqs=CERT_NONE",
                                 "rediss://redis.example.com:6380/1?ssl_cert_reqs=optional",
                                 f"redis+socket:///run/redis/redis.sock?password={PASSWORD}&virtual_host=2"])
def test_every_kind_of_redis_url_kombu_and_celery_take_is_accepted(url):
    from worker.app import make_app

    settings = Settings(broker_url=url, result_backend=url)
    app = make_app(settings)
    assert app.connection_for_write().transport.driver_type == "redis"  # kombu's transport for the broker
    assert type(app.backend).__name__ == "RedisBackend"


def test_an_empty_result_backend_or_s3_endpoint_in_an_env_file_means_unset(monkeypatch):
    monkeypatch.setenv("INPAINT_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("INPAINT_RESULT_BACKEND", "")
    monkeypatch.setenv("INPAINT_S3_ENDPOINT_URL", " ")
    settings = Settings()
    assert settings.backend_url == "redis://redis:6379/0" and settings.s3_endpoint_url is None  # AWS
