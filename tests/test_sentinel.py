"""Redis without a single point of failure: workers and clients find the master through Sentinel, and a master that
dies with 50 jobs queued and running loses none of them and runs none twice.

The slow test runs a real redis-server master and replica and three redis-sentinel processes on loopback (free
ports, one temporary directory), with passwords on both the master and the Sentinels.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import job_request, outputs, runs

HOST = socket.gethostname()
MASTER = "inpaint"
MASTER_PASSWORD = "master-Pw-7x"
SENTINEL_PASSWORD = "sentinel-Pw-9q"
RECOVERY = {"INPAINT_VISIBILITY_TIMEOUT_S": "20", "INPAINT_MAX_DEADLINE_S": "10", "INPAINT_DEADLINE_MARGIN_S": "5",
            "INPAINT_UNACKED_RESTORE_INTERVAL_S": "1", "INPAINT_UNACKED_RESTORE_THROTTLE": "1"}
JOBS, AFTER = 50, 5  # queued or running when the master dies; submitted once the new master is there


def sentinel_url(ports: list[int], password: str = MASTER_PASSWORD) -> str:
    return ";".join(f"sentinel://:{password}@127.0.0.1:{port}/0" for port in ports)


# --- settings: fast ---------------------------------------------------------------------------------------------

def test_sentinel_urls_need_a_master_name_and_the_error_names_the_variable():
    from pydantic import ValidationError

    from worker.settings import Settings

    with pytest.raises(ValidationError) as error:
        Settings(broker_url=sentinel_url([26379, 26380]))
    assert "INPAINT_REDIS_MASTER_NAME must be set with sentinel:// URLs" in str(error.value)
    assert MASTER_PASSWORD not in str(error.value)


@pytest.mark.parametrize("url", ["sentinel://:pw@h1:26379;redis://h2:6379/0", "sentinel://;sentinel://h2:26379"])
def test_a_sentinel_list_with_another_scheme_or_no_host_is_refused(url):
    from pydantic import ValidationError

    from worker.settings import Settings

    with pytest.raises(ValidationError, match="must list Sentinels as sentinel://host:port"):
        Settings(broker_url=url, redis_master_name=MASTER)


def test_master_name_or_sentinel_password_without_sentinel_urls_is_refused():
    from pydantic import ValidationError

    from worker.settings import Settings

    with pytest.raises(ValidationError, match="are for sentinel:// URLs"):
        Settings(broker_url="redis://localhost:6379/0", redis_sentinel_password=SENTINEL_PASSWORD)


@pytest.mark.parametrize("client", [False, True], ids=["worker", "client"])
def test_the_master_name_and_sentinel_password_reach_broker_and_backend_and_never_the_settings_repr(client):
    from worker.app import make_app
    from worker.settings import Settings

    settings = Settings(broker_url=sentinel_url([26379, 26380]), redis_master_name=MASTER,
                        redis_sentinel_password=SENTINEL_PASSWORD)
    app = make_app(settings, client=client)
    for options in (app.conf.broker_transport_options, app.conf.result_backend_transport_options):
        assert options["master_name"] == MASTER
        assert options["sentinel_kwargs"]["password"] == SENTINEL_PASSWORD
        assert options["sentinel_kwargs"]["socket_timeout"] > 0
    assert app.connection_for_write().transport.__class__.__name__ == "SentinelTransport"
    assert type(app.backend).__name__ == "SentinelBackend"
    assert SENTINEL_PASSWORD not in repr(settings) and SENTINEL_PASSWORD not in str(settings.model_dump())


# --- a real Sentinel group ----------------------------------------------------------------------------------------

class SentinelGroup:
    """A master, a replica and three Sentinels (quorum 2) on loopback, each with its files under `directory`."""

    def __init__(self, directory: Path, down_after_ms: int = 1000):
        from worker.stack import RedisServer, free_port

        self.directory, self.down_after_ms = directory, down_after_ms
        auth = ("--masterauth", MASTER_PASSWORD)  # the master becomes a replica when it comes back
        self.master = RedisServer(directory / "master", password=MASTER_PASSWORD, args=auth)
        self.replica = RedisServer(directory / "replica", password=MASTER_PASSWORD,
                                   args=(*auth, "--replicaof", "127.0.0.1", str(self.master.port)))
        self.ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return sentinel_url(self.ports)

    def sentinel(self, port: int):
        import redis

        return redis.Redis(port=port, password=SENTINEL_PASSWORD, socket_timeout=2, decode_responses=True)

    def start(self) -> SentinelGroup:
        from worker.stack import wait_started

        self.master.start()
        self.replica.start()
        for port in self.ports:
            folder = self.directory / f"sentinel-{port}"
            folder.mkdir(parents=True)
            conf = folder / "sentinel.conf"  # Sentinel rewrites its file: one each, writable
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {folder}\nrequirepass {SENTINEL_PASSWORD}\n"
                            f"sentinel monitor {MASTER} 127.0.0.1 {self.master.port} 2\n"
                            f"sentinel auth-pass {MASTER} {MASTER_PASSWORD}\n"
                            f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}\n"
                            f"sentinel failover-timeout {MASTER} 10000\n")
            with open(folder / "sentinel.log", "ab") as log:
                self.sentinels.append(subprocess.Popen(["redis-sentinel", str(conf)], stdout=log,
                                                       stderr=subprocess.STDOUT))
            wait_started(lambda port=port: self.sentinel(port).ping(), 20, "redis-sentinel", self.sentinels[-1],
                         folder / "sentinel.log")
        # each Sentinel must know the replica and the two others before a failover can be agreed on
        for port, process in zip(self.ports, self.sentinels, strict=True):
            wait_started(lambda port=port: self.knows_everyone(port), 30, "Sentinel discovery", process,
                         self.directory / f"sentinel-{port}" / "sentinel.log")
        return self

    def knows_everyone(self, port: int) -> bool:
        state = self.sentinel(port).sentinel_master(MASTER)
        return state["num-slaves"] == 1 and state["num-other-sentinels"] == 2

    def master_port(self) -> int:
        for port in self.ports:
            try:
                return int(self.sentinel(port).sentinel_get_master_addr_by_name(MASTER)[1])
            except Exception:
                continue
        raise RuntimeError("no Sentinel answers")

    def stop(self) -> None:
        from worker.stack import stop_process

        for process in self.sentinels:
            stop_process(process, timeout=10)
        self.replica.stop()
        self.master.stop()


def terminal_states(client, job_ids: list[str]) -> dict[str, str]:
    """The jobs among `job_ids` whose state is final, in one round trip: id -> state."""
    backend = client.app.backend
    values = client.redis.mget([backend.get_key_for_task(job_id) for job_id in job_ids])
    states = {job_id: backend.decode(value)["status"] for job_id, value in zip(job_ids, values, strict=True) if value}
    return {job_id: state for job_id, state in states.items() if state in ("SUCCESS", "FAILURE", "REVOKED")}


def follow(client, job_ids: list[str], ended: dict[str, float], timeout: float) -> None:
    """Note when each job is seen ending (polled every 0.1 s), through failovers: Redis errors are retried."""
    deadline = time.monotonic() + timeout
    while waiting := [job_id for job_id in job_ids if job_id not in ended]:
        assert time.monotonic() < deadline, f"{len(waiting)} jobs not done after {timeout:g} s"
        try:
            done = terminal_states(client, waiting)
        except Exception:  # the master is away, or a connection still points at the dead one
            done = {}
        now = time.monotonic()
        for job_id in done:
            ended[job_id] = now
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigkill", pytest.param("sentinel-failover", marks=pytest.mark.xfail(
    strict=True, raises=AssertionError, reason="split brain: SENTINEL FAILOVER promotes the replica but leaves the old "
    "master a master, with the workers' and clients' connections on it, until a Sentinel converts it (10 s here); "
    "what they write there meanwhile is flushed when it resyncs (docs/RELIABILITY.md, Sentinel)"))])
def test_a_master_lost_with_50_jobs_queued_and_running_fails_over_and_loses_none(tiny_model_dir, tmp_path, worker_env,
                                                                                run_log, how):
    """`sigkill`: the master dies (a crash, a host lost); `sentinel-failover`: `SENTINEL FAILOVER`, as for maintenance,
    where the old master stays up and becomes a replica (its blocked clients are unblocked with an error)."""
    from worker.app import make_app
    from worker.client import InpaintClient
    from worker.stack import LocalStack, stop_process

    group = SentinelGroup(tmp_path / "sentinel")
    stack = LocalStack(tmp_path / "stack", model=str(tiny_model_dir))
    workers = []
    try:
        group.start()
        stack.start()  # S3; its own redis-server is not used
        sentinel_env = {"INPAINT_BROKER_URL": group.url, "INPAINT_REDIS_MASTER_NAME": MASTER,
                        "INPAINT_REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD}
        settings = stack.settings(**{k.removeprefix("INPAINT_").lower(): v for k, v in {**RECOVERY,
                                                                                        **sentinel_env}.items()})
        client = InpaintClient(make_app(settings, client=True), settings.result_expires_s, settings=settings)
        workers = [stack.start_worker(f"sentinel-{name}@{HOST}", **worker_env, **RECOVERY, **sentinel_env)
                   for name in "ab"]
        for worker in workers:
            worker.wait_ready(client.app)
        old_port, new_port = group.master.port, group.replica.port
        assert client.redis.connection_pool.get_master_address() == ("127.0.0.1", old_port)

        request = job_request(stack, num_inference_steps=4, plugins={"testkit": {"step_s": 0.05}})
        submitted_at = time.monotonic()
        job_ids = [client.submit(dict(request)) for _ in range(JOBS)]
        ended: dict[str, float] = {}
        deadline = time.monotonic() + 120
        while len(terminal_states(client, job_ids)) < 5:  # some done, the rest queued or running
            assert time.monotonic() < deadline, "jobs did not start"
            time.sleep(0.05)
        ended.update(dict.fromkeys(terminal_states(client, job_ids), time.monotonic()))
        done_before = len(ended)
        killed_at = time.monotonic()
        if how == "sigkill":
            stop_process(group.master.process, signal.SIGKILL)
        else:
            group.sentinel(group.ports[0]).execute_command("SENTINEL", "FAILOVER", MASTER)
        while group.master_port() != new_port:
            assert time.monotonic() - killed_at < 60, "the Sentinels did not promote the replica"
            time.sleep(0.05)
        failover_s = time.monotonic() - killed_at
        follow(client, job_ids, ended, timeout=180)

        after = [client.submit(dict(request)) for _ in range(AFTER)]  # new work, once the workers reconnected
        after_submitted = time.monotonic()
        follow(client, after, ended, timeout=60)
        after_s = max(ended[job_id] for job_id in after) - after_submitted

        # the clients' Redis for claims and cancel flags follows the master: Celery's SentinelBackend client
        assert client.redis.connection_pool.get_master_address() == ("127.0.0.1", new_port)
        assert client.redis.execute_command("ROLE")[0] in (b"master", "master")
        statuses = {job_id: client.status(job_id) for job_id in job_ids + after}
        stored = {job_id: outputs(stack, job_id) for job_id in job_ids + after}
    finally:
        for worker in workers:
            worker.stop()
        stack.stop()
        group.stop()
    logs = "".join(worker.log_path.read_text() for worker in workers)
    failed = {job_id: (status.state, status.error) for job_id, status in statuses.items() if status.state != "SUCCESS"}
    assert failed == {}, "\n".join(line for line in logs.splitlines() if any(job_id in line for job_id in failed))
    for job_id in job_ids + after:
        assert stored[job_id] == ["0.png", "result.json"], job_id  # one result set each
        assert runs(run_log, job_id)[1] == 1, (job_id, runs(run_log, job_id))  # finished once
    started_twice = sum(runs(run_log, job_id)[0] > 1 for job_id in job_ids)
    after_kill = sorted(t - killed_at for t in ended.values() if t > killed_at)
    gaps = [b - a for a, b in zip([0.0, *after_kill], after_kill, strict=False)]
    print(f"\nSentinel failover ({how}) with {JOBS - done_before} of {JOBS} jobs queued or running: "
          f"replica promoted {failover_s:.1f} s after; first job done after at "
          f"{after_kill[0]:.1f} s, longest wait between two jobs ending {max(gaps):.1f} s; all {JOBS} done "
          f"{max(ended[j] for j in job_ids) - submitted_at:.1f} s after submitting; {started_twice} started twice "
          f"(a copy dropped), none finished twice; {AFTER} jobs submitted after the failover done within "
          f"{after_s:.1f} s")
