"""What a web backend sees when Redis is away or a job id is malformed: a clear error within seconds, no hang."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import redis

from tests.support import BROKER_PASSWORD as PASSWORD
from tests.support import dead_client
from worker.app import make_app
from worker.client import InpaintClient, RedisUnavailable
from worker.errors import InvalidRequest
from worker.settings import Settings
from worker.stack import RedisServer, free_port

REQUEST = {"prompt": "x", "image": "s3://inputs/a.png", "mask_image": "s3://inputs/b.png"}
BOUND_S = 15  # a behaviour bound (the fix takes well under a second), not a benchmark: a worker's app took 95 s


def timed(call) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        call()
    except BaseException as error:  # noqa: B036 - the test inspects what was raised
        return error, time.monotonic() - started
    return None, time.monotonic() - started


def test_every_client_call_fails_fast_naming_redis_without_its_password(monkeypatch):
    port = free_port()
    monkeypatch.setenv("INPAINT_BROKER_URL", f"redis://:{PASSWORD}@127.0.0.1:{port}/0")
    client = InpaintClient.from_env()
    for name, call in [("submit", lambda: client.submit(REQUEST)), ("status", lambda: client.status("order-1")),
                       ("wait", lambda: client.wait("order-1", timeout=2)), ("cancel", lambda: client.cancel("a"))]:
        error, took = timed(call)
        assert isinstance(error, RedisUnavailable), (name, error)
        assert isinstance(error, ConnectionError)
        assert took < BOUND_S, f"{name} took {took:.1f} s"
        assert f"cannot reach Redis at redis://127.0.0.1:{port}/0" in str(error), str(error)
        assert PASSWORD not in str(error) and PASSWORD not in error.url


@pytest.mark.slow
def test_a_host_that_drops_connections_cannot_hang_submit_or_status():
    # a listener whose accept queue is full: the kernel drops further SYNs, as a firewalled host does
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    port = hole.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    try:
        client = dead_client(port)
        for call in (lambda: client.submit(REQUEST), lambda: client.status("order-1")):
            error, took = timed(call)
            assert isinstance(error, RedisUnavailable), error
            assert took < BOUND_S, f"took {took:.1f} s"  # the connect timeout (5 s), not the kernel's 2 minutes
    finally:
        for sock in (*fillers, hole):
            sock.close()


@pytest.mark.slow
def test_a_client_works_again_once_redis_is_back_and_wait_honours_its_timeout(tmp_path):
    server = RedisServer(tmp_path / "redis")  # its port is chosen; nothing listens there yet
    client = InpaintClient.from_settings(Settings(broker_url=server.url))
    error, _ = timed(lambda: client.status("later-1"))
    assert isinstance(error, RedisUnavailable)
    server.start()
    try:
        assert client.status("later-1").state == "PENDING"
        error, took = timed(lambda: client.wait("later-1", timeout=1))
        assert isinstance(error, TimeoutError) and "still PENDING after 1 s" in str(error), error
        assert 0.9 < took < BOUND_S
    finally:
        server.stop()


def test_workers_keep_retrying_redis_and_clients_do_not():
    settings = Settings()
    worker_conf, client_conf = make_app(settings).conf, make_app(settings, client=True).conf
    assert worker_conf.result_backend_always_retry is True  # a job's outcome survives a Redis restart
    assert client_conf.result_backend_always_retry is False
    for conf in (worker_conf, client_conf):  # a connect to a silent host is bounded in both
        assert conf.redis_socket_connect_timeout <= 5
        assert conf.broker_transport_options["socket_connect_timeout"] <= 5
    assert InpaintClient.from_settings(settings).app.conf.result_backend_always_retry is False


@pytest.mark.parametrize("job_id", ["order-1\n", "order-1\r\n", "\norder-1"])
def test_a_job_id_with_a_newline_is_refused_before_redis_is_asked(job_id):
    # the dead client proves nothing was sent: reaching Redis would raise RedisUnavailable instead
    with pytest.raises(InvalidRequest) as caught:
        dead_client().submit(REQUEST, job_id=job_id)
    assert caught.value.field == "job_id"


def test_two_different_job_ids_are_refused_before_redis_is_asked():
    with pytest.raises(InvalidRequest) as caught:
        dead_client().submit({**REQUEST, "job_id": "order-1"}, job_id="order-2")
    assert caught.value.field == "job_id" and "'order-1'" in caught.value.message


@pytest.mark.slow
def test_a_broker_that_takes_the_connection_and_never_answers_cannot_hang_submit(tmp_path):
    silent = socket.socket()  # the kernel completes connects into its backlog; nothing ever replies
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    backend = RedisServer(tmp_path / "redis").start()
    try:
        client = InpaintClient.from_settings(Settings(broker_url=f"redis://127.0.0.1:{silent.getsockname()[1]}/0",
                                                      result_backend=backend.url))
        error, took = timed(lambda: client.submit(REQUEST, job_id="order-7"))
        assert isinstance(error, RedisUnavailable), error
        assert took < BOUND_S * 2, f"took {took:.1f} s"
        # nothing was queued, so the id is free again: a retry once the broker is back sends the job
        assert client.redis.exists("inpaint:submitted:order-7") == 0
    finally:
        backend.stop()
        silent.close()


@pytest.mark.slow
def test_a_broker_that_stalls_mid_send_fails_submit_within_one_timeout_and_a_retry_sends_the_job(tmp_path):
    broker, backend = RedisServer(tmp_path / "broker").start(), RedisServer(tmp_path / "backend").start()
    try:
        client = InpaintClient.from_settings(Settings(broker_url=broker.url, result_backend=backend.url))
        client.submit(REQUEST, job_id="order-warm")  # the client's broker connection is open
        os.kill(broker.process.pid, signal.SIGSTOP)  # Redis takes what is sent and answers nothing
        try:
            error, took = timed(lambda: client.submit(REQUEST, job_id="order-8"))
        finally:
            os.kill(broker.process.pid, signal.SIGCONT)
        assert isinstance(error, RedisUnavailable), error
        assert took < BOUND_S * 1.5, f"took {took:.1f} s: a publish tried again after a timeout"  # it took 60 s
        assert "submitting it again with the same job_id runs it once" in str(error)
        assert client.submit(REQUEST, job_id="order-8") == "order-8"
        queued = [json.loads(message)["headers"]["id"] for message in redis.Redis.from_url(broker.url).lrange(
            "celery", 0, -1)]
        assert "order-8" in queued  # sent by the retry, and perhaps by the stalled send too: the lease runs one
        # copy (test_faults.py::test_a_dropped_broker_connection_does_not_run_the_job_twice)
    finally:
        broker.stop()
        backend.stop()


@pytest.mark.slow
def test_importing_the_client_reads_no_setting_so_explicit_settings_work(tmp_path):
    # a worker-only combination that Settings() refuses (deadline over the visibility timeout) in the environment
    code = ("from worker.client import InpaintClient\n"
            "from worker.settings import Settings\n"
            "client = InpaintClient.from_settings(Settings(_env_file=None, max_deadline_s=60))\n"
            "print(client.app.conf.broker_url)\n")
    env = {**os.environ, "INPAINT_MAX_DEADLINE_S": "7200", "INPAINT_VISIBILITY_TIMEOUT_S": "3600"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("value", [object(), float("nan"), {1, 2}])
def test_a_request_that_is_not_plain_json_is_refused_before_anything_is_sent(value):
    with pytest.raises(InvalidRequest) as caught:  # kombu raised EncodeError after the job id was claimed
        dead_client().submit({**REQUEST, "plugins": {"watermark": {"text": value}}})
    assert caught.value.field == "request" and "must be plain JSON" in caught.value.message


@pytest.mark.parametrize(("fields", "field"), [
    ({"prompt": json.loads("[" * 500 + "]" * 500)}, "prompt"),  # 1 KB of valid JSON: RecursionError in redaction
    ({"prompt": "a cat \ud83d"}, "prompt"),  # JavaScript cut the string inside an emoji
])
def test_a_hostile_request_is_refused_by_submit_naming_the_field_before_anything_is_sent(fields, field):
    with pytest.raises(InvalidRequest) as caught:
        dead_client().submit({**REQUEST, **fields})
    assert caught.value.field == field
