import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import inpaint_webhook as webhook
import pytest
from inpaint_webhook import Options, inpaint_job_failed, inpaint_job_finished, verify_signature
from pydantic import ValidationError

SECRET = "s3cr3t-key-never-logged"
WAIT_S = 15


class Server:
    """A real HTTP server on 127.0.0.1: records each request and answers with scripted statuses."""

    def __init__(self):
        self.requests: list[dict] = []
        self.statuses: list[int] = []  # answered in turn; 200 once used up
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    status = server.statuses.pop(0) if server.statuses else 200
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", f"{server.base}/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST  # noqa: N815 - a followed redirect would arrive as a GET

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = f"{self.base}/hook?token=abc"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture(autouse=True)
def env(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(webhook.ENV_ALLOW, "127.0.0.1")
    monkeypatch.setenv(webhook.ENV_SECRET, SECRET)
    monkeypatch.setenv(webhook.ENV_BACKOFF, "0.01")
    monkeypatch.setenv(webhook.ENV_TIMEOUT, "5")
    monkeypatch.delenv(webhook.ENV_ATTEMPTS, raising=False)
    yield
    assert webhook.wait_for_deliveries(WAIT_S)


@pytest.fixture
def server():
    server = Server()
    yield server
    server.stop()


def make_job(options, job_id="job-1"):
    return SimpleNamespace(id=job_id, request=SimpleNamespace(output_type="png"), options=lambda name: options)


def make_result(job_id="job-1"):
    from worker.schema import EffectiveParameters, ImageOutput, InpaintResult

    images = [ImageOutput(index=i, location=f"s3://bucket/out/{job_id}/{i}.png", url=f"https://cdn.example/{i}.png",
                          content_type="image/png", width=64, height=64, seed=i, prompt_index=0) for i in range(2)]
    parameters = EffectiveParameters(width=64, height=64, num_inference_steps=4, strength=1.0, steps_run=4,
                                     true_cfg=False, true_cfg_scale=1.0, padding_mask_crop=None, images=2,
                                     seeds=[0, 1], output_type="png", plugins=["webhook"])
    return InpaintResult(job_id=job_id, images=images, parameters=parameters,
                         timings={"total_s": 1.5, "denoise_s": 1.0}, model={"id": "test"})


def delivered() -> None:
    assert webhook.wait_for_deliveries(WAIT_S), "a delivery thread is still running"


def test_finished_job_posts_a_signed_summary(server, caplog):
    caplog.set_level(logging.DEBUG, logger="inpaint_webhook")
    before = time.time()
    assert inpaint_job_finished(job=make_job(Options(url=server.url)), result=make_result()) is None
    delivered()
    assert len(server.requests) == 1
    request = server.requests[0]
    assert request["path"] == "/hook?token=abc"
    headers = {k.lower(): v for k, v in request["headers"].items()}
    assert headers["content-type"] == "application/json"
    body = json.loads(request["body"])
    assert body["job_id"] == "job-1" and body["state"] == "SUCCESS" and body["error"] is None
    assert body["images"] == [
        {"index": i, "url": f"https://cdn.example/{i}.png", "location": f"s3://bucket/out/job-1/{i}.png"}
        for i in range(2)
    ]
    assert body["timings"] == {"total_s": 1.5, "denoise_s": 1.0}
    assert int(before) <= body["sent_at"] <= time.time() + 1
    timestamp, signature = headers["x-inpaint-timestamp"], headers["x-inpaint-signature"]
    assert timestamp == str(body["sent_at"])
    assert signature.startswith("sha256=")
    assert verify_signature(SECRET, timestamp, request["body"], signature)
    assert verify_signature(SECRET, timestamp, request["body"], signature, max_age_s=60)
    assert not verify_signature("other", timestamp, request["body"], signature)
    assert not verify_signature(SECRET, timestamp, request["body"] + b" ", signature)
    assert not verify_signature(SECRET, str(int(timestamp) + 1), request["body"], signature)
    assert not verify_signature(SECRET, timestamp, request["body"], signature, max_age_s=60, now=time.time() + 3600)
    assert not verify_signature(SECRET, timestamp, request["body"], None)
    assert SECRET.encode() not in request["body"]
    assert SECRET not in caplog.text and "token=abc" not in caplog.text
    assert "delivered" in caplog.text


def test_failed_job_posts_failure_with_the_error_code(server):
    from worker.errors import InputNotFound

    inpaint_job_failed(job=make_job(Options(url=server.url), job_id="job-2"),
                       error=InputNotFound("image: s3://bucket/missing.png does not exist"))
    delivered()
    assert len(server.requests) == 1
    body = json.loads(server.requests[0]["body"])
    assert body["job_id"] == "job-2" and body["state"] == "FAILURE"
    assert body["error"] == {"code": "input_not_found", "message": "image: s3://bucket/missing.png does not exist"}
    assert body["images"] == [] and body["timings"] == {}


def test_retries_until_a_2xx(server):
    server.statuses = [500, 500, 200]
    inpaint_job_finished(job=make_job(Options(url=server.url)), result=make_result())
    delivered()
    assert len(server.requests) == 3
    timestamps = [r["headers"]["X-Inpaint-Timestamp"] for r in server.requests]
    for request, timestamp in zip(server.requests, timestamps, strict=True):  # each attempt signed on its own
        assert verify_signature(SECRET, timestamp, request["body"], request["headers"]["X-Inpaint-Signature"])


def test_gives_up_after_the_attempt_count_without_raising(server, monkeypatch, caplog):
    monkeypatch.setenv(webhook.ENV_ATTEMPTS, "3")
    server.statuses = [500] * 10
    inpaint_job_failed(job=make_job(Options(url=server.url)), error=RuntimeError("boom"))
    delivered()
    assert len(server.requests) == 3
    assert "failed after 3 attempts: HTTP 500" in caplog.text
    assert SECRET not in caplog.text


def test_default_attempt_count_is_four(server):
    server.statuses = [503] * 10
    inpaint_job_finished(job=make_job(Options(url=server.url)), result=make_result())
    delivered()
    assert len(server.requests) == 4


def test_connection_errors_are_retried_and_never_raise(monkeypatch, caplog):
    monkeypatch.setenv(webhook.ENV_ATTEMPTS, "2")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    inpaint_job_finished(job=make_job(Options(url=f"http://127.0.0.1:{port}/hook")), result=make_result())
    delivered()
    assert "failed after 2 attempts" in caplog.text


def test_host_not_on_the_allow_list_is_refused(monkeypatch):
    with pytest.raises(ValidationError, match="INPAINT_WEBHOOK_ALLOW") as raised:
        Options(url="https://evil.example/hook")
    assert "evil.example" in str(raised.value)
    monkeypatch.setenv(webhook.ENV_ALLOW, "hooks.example.com, 127.0.0.1:8080")
    assert Options(url="https://HOOKS.example.com/x").url == "https://HOOKS.example.com/x"
    assert Options(url="http://127.0.0.1:9999/x").url  # hostnames match; ports are not part of the match
    with pytest.raises(ValidationError, match="INPAINT_WEBHOOK_ALLOW"):
        Options(url="https://evil.hooks.example.com/x")  # exact match, no subdomains
    monkeypatch.setenv(webhook.ENV_ALLOW, "")
    with pytest.raises(ValidationError, match="INPAINT_WEBHOOK_ALLOW is empty"):
        Options(url="http://127.0.0.1/x")


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "file:///etc/passwd", "127.0.0.1/x", "http:///x",
                                 "http://user:pw@127.0.0.1/x", "http://evil.example%2f@127.0.0.1/x",
                                 "http://127.0.0.1:99999/x", "http://127.0.0.1/a b"])
def test_malformed_urls_are_refused(url):
    with pytest.raises(ValidationError):
        Options(url=url)


def test_unknown_fields_and_events_are_refused():
    with pytest.raises(ValidationError):
        Options.model_validate({"url": "http://127.0.0.1/x", "secret": "mine"})
    with pytest.raises(ValidationError):
        Options(url="http://127.0.0.1/x", events=["started"])
    with pytest.raises(ValidationError):
        Options(url="http://127.0.0.1/x", events=[])


def test_refusal_becomes_invalid_request_naming_the_plugin():
    from worker.errors import InvalidRequest
    from worker.plugins import Plugins

    plugins = Plugins(load_entry_points=False, builtins=())
    plugins.register(webhook, name="webhook")
    with pytest.raises(InvalidRequest) as raised:
        plugins.check_options({"webhook": {"url": "https://evil.example/hook"}})
    assert raised.value.field == "plugins.webhook.url" and "INPAINT_WEBHOOK_ALLOW" in raised.value.message


def test_events_filter(server):
    inpaint_job_finished(job=make_job(Options(url=server.url, events=["failed"])), result=make_result())
    delivered()
    assert server.requests == []
    inpaint_job_failed(job=make_job(Options(url=server.url, events=["failed"])), error=RuntimeError("x"))
    delivered()
    assert len(server.requests) == 1


def test_without_a_url_nothing_is_sent(server):
    # the worker builds Options() for every active plugin a request does not name: that must be valid and silent
    inpaint_job_finished(job=make_job(Options()), result=make_result())
    inpaint_job_failed(job=make_job({}), error=RuntimeError("x"))  # a raw dict (options: true)
    delivered()
    assert server.requests == []


def test_redirects_are_not_followed(server, monkeypatch, caplog):
    monkeypatch.setenv(webhook.ENV_ATTEMPTS, "2")
    server.statuses = [302, 302]
    inpaint_job_finished(job=make_job(Options(url=server.url)), result=make_result())
    delivered()
    assert [r["path"] for r in server.requests] == ["/hook?token=abc", "/hook?token=abc"]
    assert "redirect not followed" in caplog.text


def test_unsigned_without_a_secret_warns_once(server, monkeypatch, caplog):
    monkeypatch.delenv(webhook.ENV_SECRET)
    monkeypatch.setattr(webhook, "_warned_unsigned", False)
    for _ in range(2):
        inpaint_job_finished(job=make_job(Options(url=server.url)), result=make_result())
        delivered()
    assert len(server.requests) == 2
    assert all("X-Inpaint-Signature" not in r["headers"] for r in server.requests)
    assert all("X-Inpaint-Timestamp" in r["headers"] for r in server.requests)
    assert caplog.text.count("sent unsigned") == 1


def test_hook_returns_at_once_while_delivery_retries(server, monkeypatch):
    monkeypatch.setenv(webhook.ENV_BACKOFF, "0.3")
    server.statuses = [500, 500]
    started = time.monotonic()
    inpaint_job_finished(job=make_job(Options(url=server.url)), result=make_result())
    assert time.monotonic() - started < 0.2  # the job does not wait for the backoff (0.3 + 0.6 s)
    thread = webhook._deliveries[-1]
    assert thread.daemon is False  # the process waits for the delivery at exit
    delivered()
    assert len(server.requests) == 3


def test_a_broken_job_object_never_raises(caplog):
    job = SimpleNamespace(id="job-x", options=lambda name: {"url": "https://evil.example/"})
    inpaint_job_finished(job=job, result=None)
    assert "not sent" in caplog.text


@pytest.mark.parametrize(("name", "value"), [
    (webhook.ENV_ATTEMPTS, "0"), (webhook.ENV_ATTEMPTS, "11"), (webhook.ENV_ATTEMPTS, "1000000"),
    (webhook.ENV_ATTEMPTS, "many"), (webhook.ENV_BACKOFF, "-1"), (webhook.ENV_BACKOFF, "31"),
    (webhook.ENV_BACKOFF, "1e9"), (webhook.ENV_BACKOFF, "inf"), (webhook.ENV_BACKOFF, "nan"),
    (webhook.ENV_BACKOFF, "soon"), (webhook.ENV_TIMEOUT, "0"), (webhook.ENV_TIMEOUT, "-1"),
    (webhook.ENV_TIMEOUT, "3600"),
])
def test_numbers_out_of_bounds_are_refused_naming_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"^{name}=.*between"):
        webhook.Settings.from_env()


def test_numbers_within_bounds_are_taken(monkeypatch):
    monkeypatch.setenv(webhook.ENV_ATTEMPTS, "10")
    monkeypatch.setenv(webhook.ENV_BACKOFF, "30")
    monkeypatch.setenv(webhook.ENV_TIMEOUT, "0.5")
    settings = webhook.Settings.from_env()
    assert (settings.attempts, settings.backoff_s, settings.timeout_s) == (10, 30.0, 0.5)
    assert settings.secret == SECRET.encode()
    assert SECRET not in repr(settings) and SECRET not in str(settings)
    # each wait doubles, and none is over a minute: a delivery that keeps failing ends within 10 x 30 + 9 x 60 s
    assert [settings.wait_s(n) for n in range(1, 10)] == [30, 60, 60, 60, 60, 60, 60, 60, 60]
    assert [webhook.Settings().wait_s(n) for n in range(1, 4)] == [0.5, 1, 2]
    with pytest.raises(ValueError, match=webhook.ENV_ATTEMPTS):
        webhook.Settings(attempts=1000)


def test_a_bad_number_fails_the_plugin_when_it_loads():
    env = {**os.environ, webhook.ENV_ATTEMPTS: "1000"}
    loaded = subprocess.run([sys.executable, "-c", "import inpaint_webhook"], cwd=Path(webhook.__file__).parent,
                            env=env, capture_output=True, text=True, timeout=60)
    assert loaded.returncode != 0
    assert "ValueError: INPAINT_WEBHOOK_ATTEMPTS='1000' is not valid: it must be a whole number between 1 and 10" \
        in loaded.stderr


def test_a_bad_number_set_after_loading_is_logged_and_nothing_is_sent(server, monkeypatch, caplog):
    monkeypatch.setenv(webhook.ENV_BACKOFF, "86400")
    inpaint_job_finished(job=make_job(Options(url=server.url)), result=make_result())  # never raises
    delivered()
    assert server.requests == []
    assert "not sent" in caplog.text and webhook.ENV_BACKOFF in caplog.text


def test_a_webhook_url_is_logged_without_its_credentials_or_query():
    shown = webhook.redact("https://user:pa55word@hooks.example.com/cb?token=T0KEN#frag")
    assert shown == "https://hooks.example.com/cb?..."
