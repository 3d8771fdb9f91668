"""What operators watch: Prometheus metrics, JSON logs with the job id on every line, the documented settings."""

from __future__ import annotations

import importlib
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support import job_request as job
from worker.settings import Settings

ROOT = Path(__file__).parent.parent


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


@pytest.mark.slow
def test_metrics_count_jobs_by_outcome_and_time_them(stack, client, worker):
    before = scrape(worker.metrics_port)
    assert client.wait(client.submit(job(stack)), timeout=60).state == "SUCCESS"
    failed = client.wait(client.submit(job(stack, image="s3://inputs/nothing-here.png")), timeout=60)
    assert failed.error["code"] == "input_not_found"
    after = scrape(worker.metrics_port)

    def moved(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert moved('inpaint_jobs_total{outcome="success"}') == 1
    assert moved('inpaint_jobs_total{outcome="input_not_found"}') == 1
    assert moved("inpaint_job_duration_seconds_count") == 2
    assert moved("inpaint_queue_wait_seconds_count") == 2
    assert moved("inpaint_step_seconds_count") == 1
    assert after["inpaint_model_load_seconds"] > 0


@pytest.mark.slow
def test_a_job_delivered_again_after_it_succeeded_is_not_counted_twice(stack, client, worker):
    job_id = client.submit(job(stack))
    assert client.wait(job_id, timeout=60).state == "SUCCESS"
    before = scrape(worker.metrics_port)
    client.app.send_task("inpaint", kwargs={"request": job(stack)}, task_id=job_id)  # as after a lost ack
    client.wait(client.submit(job(stack)), timeout=60)  # one worker: the copy was taken before this one
    after = scrape(worker.metrics_port)
    assert after['inpaint_jobs_total{outcome="success"}'] - before['inpaint_jobs_total{outcome="success"}'] == 1
    assert after["inpaint_job_duration_seconds_count"] - before["inpaint_job_duration_seconds_count"] == 1


@pytest.mark.parametrize(("env", "named"), [
    ({"INPAINT_MODEL": "/nonexistent/model"}, "/nonexistent/model"),
    ({"INPAINT_OUTPUT_BUCKET": ""}, "INPAINT_OUTPUT_BUCKET"),
])
@pytest.mark.slow
def test_a_worker_that_cannot_load_exits_saying_why_instead_of_failing_every_job(stack, client, env, named):
    node = f"broken-{time.monotonic_ns()}@{socket.gethostname()}"
    broken = stack.start_worker(node, **env)
    try:
        assert broken.process.wait(120) == 1  # launch restarts it with backoff; its health check never passes
    finally:
        broken.stop()
    log = broken.log_path.read_text()
    assert "worker cannot start and exits" in log and named in log, log[-2000:]


@pytest.mark.slow
def test_a_worker_logs_its_model_and_metrics_at_start(worker):
    log = worker.log_path.read_text()
    assert re.search(r"worker ready: model \S+ on cpu loaded in", log), log[-2000:]
    assert f":{worker.metrics_port}/metrics" in log


@pytest.mark.slow
def test_json_logs_carry_the_job_id_on_every_line_of_a_job(stack, client, worker):
    job_id = client.submit(job(stack))
    assert client.wait(job_id, timeout=60).state == "SUCCESS"
    time.sleep(0.5)  # let the last lines reach the file
    lines = [json.loads(line) for line in worker.log_path.read_text().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("job_id") == job_id]
    messages = [line["message"] for line in mine]
    assert "job started" in messages and any(m.startswith("job succeeded") for m in messages)
    # every line the job logged, and every line that speaks of it, carries its id
    assert all(line.get("job_id") == job_id for line in lines if job_id in line["message"]
               and "received" not in line["message"])
    assert {"ts", "level", "logger", "message"} <= set(mine[0])


@pytest.mark.parametrize(("header", "expected"), [(None, {}), ("yesterday", {}), (True, {}), ([1], {}),
                                                  (0, {}), ("1e9", {})])
def test_a_queue_wait_header_that_is_not_a_time_is_ignored(header, expected):
    from types import SimpleNamespace

    from worker.tasks import queue_wait  # any send_task caller may set the header, to anything

    assert queue_wait(SimpleNamespace(inpaint_submitted_at=header)) == expected
    assert queue_wait(SimpleNamespace(inpaint_submitted_at=time.time() - 2))["queue_wait_s"] >= 2


def test_the_readme_configuration_table_lists_every_setting_with_its_default():
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(INPAINT_\w+)` \| ([^|]+) \|", readme, re.M))
    read_elsewhere = {name for path in (ROOT / "worker").rglob("*.py")  # settings come from Settings only
                      for name in re.findall(r'os\.environ(?:\.get\(|\[)"(INPAINT_\w+)"', path.read_text())}
    assert read_elsewhere == set(), "worker/ reads these INPAINT_* variables itself, not through Settings"
    expected = {f"INPAINT_{name.upper()}" for name in Settings.model_fields}
    assert set(rows) == expected, f"missing: {expected - set(rows)}, unknown: {set(rows) - expected}"
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, int | float | str) and not isinstance(default, bool):
            shown = rows[f"INPAINT_{name.upper()}"]
            assert str(default) in shown or f"{default:g}" in shown if isinstance(default, float) else \
                str(default) in shown, f"INPAINT_{name.upper()}: README says {shown.strip()}, the default is {default}"


def test_text_log_lines_carry_the_job_id():
    """The default log format: every line formats, and those logged during a job name it."""
    import io
    import logging

    from worker import logs

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logs.configure("text", "INFO")
    stream = io.StringIO()
    root.handlers[0].setStream(stream)
    token = logs.current_job.set("job-42")
    try:
        logging.getLogger("worker.test").info("fetched %d inputs", 2)
        logs.current_job.reset(token)
        logging.getLogger("worker.test").warning("idle, %s", "waiting")
    finally:
        root.handlers[:], root.level = handlers, level
    first, second = stream.getvalue().splitlines()
    assert first.endswith("INFO worker.test: [job job-42] fetched 2 inputs")
    assert second.endswith("WARNING worker.test: idle, waiting")


@pytest.fixture
def json_log():
    """The worker's JSON log configuration, writing to a string; the test's own logging is put back after."""
    import io
    import logging

    from worker import logs

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    yield lambda level: (logs.configure("json", level), root.handlers[0].setStream(stream)), stream
    root.handlers[:], root.level = handlers, level
    logging.captureWarnings(False)
    for library in ("diffusers", "transformers"):  # as the libraries set themselves up
        library_logging = importlib.import_module(f"{library}.utils.logging")
        library_logging.enable_default_handler()
        library_logging.disable_propagation()
        library_logging.enable_progress_bar()


def test_diffusers_and_transformers_lines_are_json_with_the_job_id_and_follow_the_level(json_log):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from worker import logs

    configure, stream = json_log
    configure("WARNING")
    token = logs.current_job.set("job-43")
    try:
        diffusers_logging.get_logger("diffusers.pipelines.x").warning("true_cfg_scale is passed as 4.0")
        transformers_logging.get_logger("transformers.models.y").warning("a transformers warning")
        configure("ERROR")
        diffusers_logging.get_logger("diffusers.pipelines.x").warning("below the level")
    finally:
        logs.current_job.reset(token)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["logger"], line["message"], line["job_id"]) for line in lines] == [
        ("diffusers.pipelines.x", "true_cfg_scale is passed as 4.0", "job-43"),
        ("transformers.models.y", "a transformers warning", "job-43")]
    # the bars drawn while a model loads are no log lines: off, as the worker logs the load time
    assert not diffusers_logging.is_progress_bar_enabled() and not transformers_logging.is_progress_bar_enabled()


def test_python_warnings_are_json_log_lines():
    code = ("import warnings; from worker import logs; logs.configure('json', 'INFO', libraries=()); "
            "warnings.warn('a library deprecation', DeprecationWarning, stacklevel=1)")
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    [line] = [json.loads(line) for line in done.stderr.splitlines()]
    assert line["logger"] == "py.warnings" and "DeprecationWarning: a library deprecation" in line["message"]


def test_a_lease_renewal_that_fails_logs_the_job_id(json_log, tmp_path, monkeypatch):
    import redis

    from worker import lease, logs
    from worker.stack import RedisServer

    configure, stream = json_log
    configure("INFO")
    monkeypatch.setattr(lease, "RENEW_EVERY_S", 0.1)
    server = RedisServer(tmp_path / "redis").start()
    token = logs.current_job.set("job-44")
    try:
        held = lease.JobLease(redis.Redis.from_url(server.url, socket_timeout=1), "job-44", "w1")
        assert held.acquire()
    finally:
        logs.current_job.reset(token)  # the renewing thread keeps the job's context
        server.stop()
    deadline = time.monotonic() + 10
    while "could not renew" not in stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    held.release()
    renewals = [json.loads(line) for line in stream.getvalue().splitlines() if "could not renew" in line]
    assert renewals and renewals[0]["job_id"] == "job-44" and "job job-44" in renewals[0]["message"]


@pytest.mark.slow
def test_a_stack_whose_s3_cannot_start_stops_its_redis_and_shows_the_s3_log(tmp_path):
    from worker.stack import LocalStack

    stack = LocalStack(tmp_path / "stack")
    with socket.socket() as taken:  # another program on S3's port: moto exits at once
        taken.bind(("127.0.0.1", stack.s3.port))
        taken.listen()
        with pytest.raises(RuntimeError) as caught:
            stack.start()
    message = str(caught.value)
    assert str(tmp_path / "stack" / "s3" / "s3.log") in message
    assert "in use" in message  # the log's last lines: moto's own reason
    assert stack.redis.process.poll() is not None, "redis-server was left running"
    assert stack.s3.process.poll() is not None
