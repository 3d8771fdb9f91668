"""Shared fixtures: one tiny random-weight model per session, loaded through `from_pretrained`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import Runner
from worker.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def settings(tiny_model_dir, tmp_path_factory):
    from worker.settings import Settings

    return Settings(model=str(tiny_model_dir), cache_dir=tmp_path_factory.mktemp("cache"), progress_interval_s=0)


@pytest.fixture(scope="session")
def model(settings):
    from worker.model import load_model

    return load_model(settings)


@pytest.fixture(scope="session")
def plugins():
    from worker.plugins import Plugins

    return Plugins()


@pytest.fixture
def runner(model, plugins, settings, tmp_path) -> Runner:
    return Runner(model, plugins, settings, tmp_path)


@pytest.fixture(scope="module")
def direct_pipe(tiny_model_dir):
    """Upstream's `QwenImageInpaintPipeline`, untouched, on the same weights: what a job is compared with."""
    import torch
    from diffusers import QwenImageInpaintPipeline

    pipe = QwenImageInpaintPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- the queue: a private redis-server, a loopback S3 endpoint, real worker processes -------------------------

PLUGIN_SITE = Path(__file__).parent / "plugin_site"


@pytest.fixture(scope="session")
def stack(tiny_model_dir, tmp_path_factory):
    from worker.stack import LocalStack

    local = LocalStack(tmp_path_factory.mktemp("stack"), model=str(tiny_model_dir)).start()
    yield local
    local.stop()


@pytest.fixture(scope="session")
def run_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs") / "runs.log"


@pytest.fixture(scope="session")
def worker_env(run_log) -> dict:
    """What test workers get beyond the stack: the testkit plugin installed, fast progress."""
    import os

    return {"PYTHONPATH": os.pathsep.join([str(PLUGIN_SITE), os.environ.get("PYTHONPATH", "")]),
            "TESTKIT_RUN_LOG": str(run_log), "INPAINT_PROGRESS_INTERVAL_S": "0.05"}


@pytest.fixture(scope="session")
def client(stack):
    from worker.app import make_app
    from worker.client import InpaintClient

    return InpaintClient(make_app(stack.settings(), client=True))  # as InpaintClient.from_env builds it


@pytest.fixture(scope="session")
def worker(stack, client, worker_env):
    import socket

    from worker.stack import free_port

    port = free_port()
    process = stack.start_worker(f"w1@{socket.gethostname()}", INPAINT_LOG_FORMAT="json",
                                 INPAINT_METRICS_PORT=str(port), INPAINT_DATA_URL_MAX_BYTES="1000000",
                                 INPAINT_HTTP_ALLOW="localhost,64:ff9b::a00:5", **worker_env).wait_ready(client.app)
    process.metrics_port = port
    yield process
    process.stop()
