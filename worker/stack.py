"""The embedded default: a private redis-server, a loopback S3 endpoint and workers, on one machine.

Used by `inpaint-worker up` (`make demo`, `make up`) and by the tests. Everything listens
on 127.0.0.1, on free ports, with its files in one temporary directory, and stops with the stack.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .launch import worker_command
from .settings import Settings

TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "local-stack-key", "AWS_SECRET_ACCESS_KEY": "local-stack-secret",
                    "AWS_DEFAULT_REGION": "us-east-1"}
FLOWER_CONF = Path(__file__).resolve().parent.parent / "flower.cfg"  # the repository's, as operators run it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Any, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} while starting")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not come up within {timeout:g} s")


def wait_started(check: Any, timeout: float, what: str, process: subprocess.Popen, log_path: Path) -> None:
    """`wait_for` a server we started; if it does not come up, stop it and say where its log is, with its end."""
    try:
        wait_for(check, timeout, what, process)
    except (RuntimeError, TimeoutError) as error:
        stop_process(process, timeout=10)
        tail = log_tail(log_path)
        ending = f"; its last lines:\n{tail}" if tail else " (empty)"
        raise type(error)(f"{error}; log: {log_path}{ending}") from None


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_process(process: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


class RedisServer:
    def __init__(self, directory: Path, appendonly: bool = False, password: str | None = None,
                 args: tuple[str, ...] = ()):
        self.directory, self.appendonly, self.password = directory, appendonly, password
        self.args = args  # more of redis-server's options, e.g. ("--replicaof", host, port)
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        if not shutil.which("redis-server"):
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--daemonize", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.args
        log_path = self.directory / "redis.log"
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        import redis

        wait_started(lambda: redis.Redis.from_url(self.url).ping(), 20, "redis-server", self.process, log_path)
        return self

    def stop(self) -> None:
        stop_process(self.process)

    def restart(self, down_s: float = 0.0) -> None:
        """Stop (SIGTERM: an append-only file is flushed) and start again on the same port and directory."""
        self.stop()
        time.sleep(down_s)
        self.start()


class S3Server:
    """moto's S3 in server mode: a real HTTP endpoint on loopback that boto3 talks to like any S3."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        import urllib.request

        self.directory.mkdir(parents=True, exist_ok=True)
        log_path = self.directory / "s3.log"
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                             str(self.port)], stdout=log, stderr=subprocess.STDOUT)
        wait_started(lambda: urllib.request.urlopen(self.endpoint, timeout=1).status < 500, 30,
                     "S3 endpoint (moto)", self.process, log_path)
        return self

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")

    def stop(self) -> None:
        stop_process(self.process)


class WorkerProcess:
    """One `celery worker` exactly as `inpaint-worker launch` starts it."""

    def __init__(self, node: str, env: dict[str, str], log_path: Path):
        self.node, self.env, self.log_path = node, env, log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        log = open(self.log_path, "ab")
        queue = self.env.get("INPAINT_QUEUE", Settings.model_fields["queue"].default)
        self.process = subprocess.Popen(worker_command(self.node, queue), env={**os.environ, **self.env},
                                        stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, app: Any, timeout: float = 180) -> WorkerProcess:
        wait_for(lambda: app.control.ping(destination=[self.node], timeout=0.5), timeout, f"worker {self.node}",
                 self.process)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        stop_process(self.process, sig, timeout)


class FlowerProcess:
    """Flower on loopback with the repository's flower.cfg, its basic-auth password generated for this process."""

    def __init__(self, broker_url: str, directory: Path, conf: Path = FLOWER_CONF, user: str = "inpaint"):
        self.broker_url, self.directory, self.conf = broker_url, directory, conf
        self.port = free_port()
        self.user, self.password = user, secrets.token_urlsafe(24)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def credentials(self) -> str:
        return f"{self.user}:{self.password}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "celery", "--broker", self.broker_url, "flower", f"--conf={self.conf}",
                f"--port={self.port}", "--address=127.0.0.1"]

    def env(self) -> dict[str, str]:
        return {**os.environ, "FLOWER_BASIC_AUTH": self.credentials, "FLOWER_DB": str(self.directory / "flower.db")}

    def start(self, timeout: float = 60) -> FlowerProcess:
        import importlib.util
        import urllib.request

        if importlib.util.find_spec("flower") is None:
            raise RuntimeError("Flower is not installed (pip install flower; the test extra has it)")
        if not self.conf.is_file():
            raise RuntimeError(f"{self.conf} not found: Flower runs from a source checkout")
        self.directory.mkdir(parents=True, exist_ok=True)
        log_path = self.directory / "flower.log"
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), env=self.env(), cwd=self.directory, stdout=log,
                                            stderr=subprocess.STDOUT)
        # /healthcheck is the one page Flower serves without credentials
        wait_started(lambda: urllib.request.urlopen(f"{self.url}/healthcheck", timeout=1).status == 200, timeout,
                     "Flower", self.process, log_path)
        return self

    def stop(self) -> None:
        stop_process(self.process)


class PageServer:
    """The reference web backend (examples/fastapi_backend) and its page for people, under uvicorn on loopback. It
    needs the source checkout and the web extras (fastapi, uvicorn: `pip install -e '.[test]'`)."""

    APP = "examples.fastapi_backend.app:app"
    ROOT = Path(__file__).resolve().parent.parent

    def __init__(self, env: dict[str, str], directory: Path):
        self.env, self.directory = env, directory
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @classmethod
    def available(cls) -> bool:
        import importlib.util

        return (cls.ROOT / "examples" / "fastapi_backend" / "app.py").is_file() and all(
            importlib.util.find_spec(name) is not None for name in ("fastapi", "uvicorn"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self, timeout: float = 60) -> PageServer:
        import urllib.request

        self.directory.mkdir(parents=True, exist_ok=True)
        log_path = self.directory / "page.log"
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", self.APP, "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=self.ROOT, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT)
        wait_started(lambda: urllib.request.urlopen(self.url, timeout=1).status == 200, timeout, "the page (uvicorn)",
                     self.process, log_path)
        return self

    def stop(self) -> None:
        stop_process(self.process)


def executable(name: str) -> str:
    """How to run console script `name` from any shell: its absolute path beside the running Python (a venv's
    bin/, which need not be on PATH), else on PATH; else the module through this Python."""
    here = Path(sys.executable).absolute().parent  # not resolved: a venv's python is a link out of the venv
    found = shutil.which(name, path=str(here)) or shutil.which(name)
    return shlex.quote(str(Path(found).absolute())) if found else f"{shlex.quote(sys.executable)} -m worker.cli"


class LocalStack:
    """Redis, S3 with an input and an output bucket, and the environment a worker and a client need."""

    BUCKETS = ("inputs", "outputs")

    def __init__(self, directory: Path | None = None, model: str | None = None, flower: bool = False,
                 redis_appendonly: bool = False, redis_password: str | None = None, page: bool = False):
        self.directory = Path(directory or tempfile.mkdtemp(prefix="inpaint-stack-"))
        self.redis = RedisServer(self.directory / "redis", appendonly=redis_appendonly, password=redis_password)
        self.s3 = S3Server(self.directory / "s3")
        self.model = model
        self.workers: list[WorkerProcess] = []
        # started before any worker, so it sees every event (Flower knows only what it has seen)
        self.flower = FlowerProcess(self.redis.url, self.directory / "flower") if flower else None
        self.page_wanted = page
        self.page: PageServer | None = None

    def start(self) -> LocalStack:
        try:
            self.redis.start()
            self.s3.start()
            self.create_buckets()
            if self.flower:
                self.flower.start()
            if self.page_wanted and PageServer.available():
                self.page = PageServer(self.env(), self.directory / "page").start()
        except BaseException:
            self.stop()  # nothing left running when a part cannot start (or on Ctrl-C while starting)
            raise
        return self

    def create_buckets(self) -> None:
        client = self.s3.client()
        for bucket in self.BUCKETS:
            client.create_bucket(Bucket=bucket)
            # the page's browser uploads inputs and downloads results straight from S3, from the page's origin
            client.put_bucket_cors(Bucket=bucket, CORSConfiguration={"CORSRules": [{
                "AllowedOrigins": ["http://127.0.0.1:*", "http://localhost:*"],
                "AllowedMethods": ["GET", "PUT", "POST"], "AllowedHeaders": ["*"], "ExposeHeaders": ["ETag"],
                "MaxAgeSeconds": 600}]})

    def env(self, **extra: str) -> dict[str, str]:
        env = {**TEST_CREDENTIALS, "INPAINT_BROKER_URL": self.redis.url, "INPAINT_S3_ENDPOINT_URL": self.s3.endpoint,
               "INPAINT_OUTPUT_BUCKET": "outputs", "INPAINT_INPUT_BUCKETS": "inputs"}
        if self.model:
            env["INPAINT_MODEL"] = self.model
        return {**env, **extra}

    def settings(self, **extra: Any) -> Settings:
        values = {k.removeprefix("INPAINT_").lower(): v for k, v in self.env().items() if k.startswith("INPAINT_")}
        return Settings(**{**values, **extra})

    def start_worker(self, node: str, **env: str) -> WorkerProcess:
        worker = WorkerProcess(node, self.env(**env), self.directory / f"{node.split('@')[0]}.log")
        self.workers.append(worker.start())
        return worker

    def how_to_use(self, image: str, mask: str, prompt: str, metrics_port: int | None = None) -> str:
        """What `inpaint-worker up` prints once the stack is up: URLs, and commands ready to paste into any shell
        (absolute paths, quoted values; no virtual environment need be active)."""
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env().items())
        lines = []
        if self.page:
            lines.append(f"Page:    {self.page.url} (upload a photo, paint the mask, watch it paint; the API's docs at "
                         f"{self.page.url}docs)")
        elif self.page_wanted:
            lines.append("Page:    not started: it needs the source checkout and fastapi and uvicorn "
                         "(pip install -e '.[test]')")
        if self.flower:
            lines.append(f"Flower:  {self.flower.url} (user {self.flower.user}, password {self.flower.password}; "
                         f"generated for this run; log: {self.flower.directory / 'flower.log'})")
        if metrics_port:
            lines.append(f"metrics: http://127.0.0.1:{metrics_port}/metrics (the worker's, for Prometheus)")
        image, mask = (shlex.quote(str(Path(path).absolute()) if Path(path).is_file() else path)
                       for path in (image, mask))
        return "\n".join([*lines, "", "The stack is up. In another shell:", f"  export {exports}",
                          f"  {executable('inpaint-worker')} submit --image {image} --mask {mask} "
                          f"--prompt {shlex.quote(prompt)}",
                          f"Results land in s3://outputs/jobs/<job id>/ at {self.s3.endpoint}. "
                          "Ctrl-C stops everything."])

    def stop(self) -> None:
        if self.page:
            self.page.stop()
        if self.flower:
            self.flower.stop()
        for worker in self.workers:
            worker.stop()
        self.s3.stop()
        self.redis.stop()
