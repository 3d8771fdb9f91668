"""A worker refuses a Redis that may evict its keys (maxmemory with a policy other than noeviction), and starts on
one it cannot check (CONFIG refused, as managed services do), saying so. Real redis-server processes."""

from __future__ import annotations

import logging
import socket

import pytest

from worker.redis_policy import check_redis, eviction_risk


@pytest.fixture(scope="module")
def redis_servers(tmp_path_factory):
    from worker.stack import RedisServer

    configs = {
        "evicting": ("--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru"),
        "volatile": ("--maxmemory", "100mb", "--maxmemory-policy", "volatile-ttl"),
        "noeviction": ("--maxmemory", "100mb", "--maxmemory-policy", "noeviction"),
        "no-maxmemory": ("--maxmemory", "0", "--maxmemory-policy", "allkeys-lru"),
        "no-config": ("--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru", "--rename-command", "CONFIG", ""),
    }
    servers = {name: RedisServer(tmp_path_factory.mktemp(name), args=args).start() for name, args in configs.items()}
    yield servers
    for server in servers.values():
        server.stop()


def client_of(server):
    import redis

    return redis.Redis.from_url(server.url)


@pytest.mark.parametrize("name", ["evicting", "volatile"])
def test_a_redis_that_evicts_keys_is_a_risk_named_with_its_policy(redis_servers, name):
    risk = eviction_risk(client_of(redis_servers[name]))
    policy = {"evicting": "allkeys-lru", "volatile": "volatile-ttl"}[name]
    assert risk and f"maxmemory-policy {policy}" in risk and "104857600 bytes" in risk


@pytest.mark.parametrize("name", ["noeviction", "no-maxmemory"])
def test_noeviction_or_no_maxmemory_is_safe(redis_servers, name):
    assert eviction_risk(client_of(redis_servers[name])) is None


def test_a_redis_that_refuses_config_is_logged_as_unchecked_not_refused(redis_servers, caplog):
    with caplog.at_level(logging.WARNING, logger="worker.redis_policy"):
        assert check_redis(client_of(redis_servers["no-config"]), "result backend") is None
    assert "could not check that the result backend Redis does not evict keys" in caplog.text
    assert "noeviction" in caplog.text


def test_an_unreachable_redis_is_logged_as_unchecked(caplog):
    import redis

    from worker.stack import free_port

    with caplog.at_level(logging.WARNING, logger="worker.redis_policy"):
        assert check_redis(redis.Redis(port=free_port(), socket_connect_timeout=1), "broker") is None
    assert "could not check that the broker Redis does not evict keys (ConnectionError" in caplog.text


@pytest.mark.slow
def test_a_worker_on_an_evicting_redis_exits_before_loading_the_model_and_says_what_to_set(redis_servers, tmp_path,
                                                                                           tiny_model_dir):
    from worker.stack import WorkerProcess

    env = {"INPAINT_BROKER_URL": redis_servers["evicting"].url, "INPAINT_MODEL": str(tiny_model_dir)}
    worker = WorkerProcess(f"evict@{socket.gethostname()}", env, tmp_path / "worker.log").start()
    try:
        assert worker.process.wait(timeout=120) == 1
    finally:
        worker.stop()
    log = worker.log_path.read_text()
    assert "the result backend Redis may lose jobs: maxmemory is 104857600 bytes with maxmemory-policy allkeys-lru" \
        in log, log[-3000:]
    assert "set maxmemory-policy noeviction" in log
    assert "worker ready" not in log  # it stopped before the model was loaded


@pytest.mark.slow
def test_a_worker_on_a_redis_that_refuses_config_starts_and_says_it_could_not_check(redis_servers, tmp_path,
                                                                                   tiny_model_dir):
    from worker.app import make_app
    from worker.settings import Settings
    from worker.stack import TEST_CREDENTIALS, WorkerProcess, free_port

    url = redis_servers["no-config"].url
    env = {**TEST_CREDENTIALS, "INPAINT_BROKER_URL": url, "INPAINT_MODEL": str(tiny_model_dir),
           "INPAINT_OUTPUT_BUCKET": "outputs", "INPAINT_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    worker = WorkerProcess(f"noconfig@{socket.gethostname()}", env, tmp_path / "worker.log").start()
    try:
        worker.wait_ready(make_app(Settings(broker_url=url), client=True), timeout=180)
    finally:
        worker.stop()
    assert "could not check that the result backend Redis does not evict keys" in worker.log_path.read_text()


def test_the_compose_files_redis_refuses_writes_when_full_rather_than_evicting():
    from tests.test_docker import command, services

    args = command(services()["redis"])
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
