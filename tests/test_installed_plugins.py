"""The plugins in plugins/, pip-installed and run by a real worker: a watermark on the image, a signed webhook."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tests.support import box_mask, photo, stored_pixels, upload

pytestmark = pytest.mark.slow  # builds and installs the plugins' wheels, then runs real workers

ROOT = Path(__file__).parent.parent
SECRET = "webhook-test-secret-5b1e"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install` the plugin packages, as an operator would, into a directory the workers import from."""
    target, sources = tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("sources")
    names = ("watermark", "webhook", "_template")
    leftovers = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    for name in names:  # built from copies: a build leaves build/ in its source, and a copy of the template ships it
        shutil.copytree(ROOT / "plugins" / name, sources / name, ignore=leftovers)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), *(str(sources / name) for name in names)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return target


@pytest.fixture(scope="module")
def receiver():
    """A webhook receiver on loopback that keeps what it was sent."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"headers": dict(self.headers), "body": body})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, received
    server.shutdown()


def plugin_env(installed: Path, worker_env: dict) -> dict:
    return {**worker_env, "PYTHONPATH": os.pathsep.join([str(installed), worker_env["PYTHONPATH"]]),
            "INPAINT_WEBHOOK_ALLOW": "127.0.0.1", "INPAINT_WEBHOOK_SECRET": SECRET, "INPAINT_WEBHOOK_BACKOFF_S": "0.05"}


def test_installed_plugins_are_listed_with_their_distribution(installed):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    done = subprocess.run([sys.executable, "-m", "worker.cli", "plugins", "--json"], env=env, capture_output=True,
                          text=True, timeout=120)
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["watermark"]["kind"] == "installed" and rows["watermark"]["distribution"] == "inpaint-watermark"
    assert rows["webhook"]["hooks"] == ["inpaint_job_failed", "inpaint_job_finished"]
    assert rows["template"]["status"] == "active"


def test_a_queued_job_carries_the_watermark_and_triggers_the_signed_webhook_unless_blocked(
        stack, installed, receiver, worker_env):
    from worker.app import make_app
    from worker.client import InpaintClient

    server, received = receiver
    client = InpaintClient(make_app(stack.settings(queue="plugged")))
    hook_url = f"http://127.0.0.1:{server.server_address[1]}/hooks/inpaint"
    request = {"prompt": "a lemon", "image": upload(stack, "plugged/photo.png", photo(128, 128)),
               "mask_image": upload(stack, "plugged/mask.png", box_mask(128, 128, (16, 16, 48, 48))),
               "num_inference_steps": 4, "seed": 3}
    with_plugins = {**request, "plugins": {"watermark": {"text": "SAMPLE", "opacity": 1.0, "margin": 4},
                                           "webhook": {"url": hook_url}}}

    env = plugin_env(installed, worker_env)
    worker = stack.start_worker(f"plugged@{socket.gethostname()}", INPAINT_QUEUE="plugged", **env)
    try:
        worker.wait_ready(client.app)
        marked = client.wait(client.submit(with_plugins), timeout=120)
        plain = client.wait(client.submit({**request, "plugins": {"watermark": False}}), timeout=120)
    finally:
        worker.stop()
    assert marked.state == "SUCCESS" and plain.state == "SUCCESS", (marked.error, plain.error)
    changed = np.argwhere((stored_pixels(stack, marked) != stored_pixels(stack, plain)).any(axis=-1))
    assert len(changed), "no watermark"
    assert changed.min(axis=0).tolist() >= [64, 64]  # only in the bottom-right corner
    deadline = time.monotonic() + 20
    while not any(json.loads(r["body"])["job_id"] == marked.job_id for r in received):
        assert time.monotonic() < deadline, "no webhook arrived"
        time.sleep(0.1)
    delivery = next(r for r in received if json.loads(r["body"])["job_id"] == marked.job_id)
    sys.path.insert(0, str(installed))
    from inpaint_webhook import verify_signature

    assert verify_signature(SECRET, delivery["headers"]["X-Inpaint-Timestamp"], delivery["body"],
                            delivery["headers"]["X-Inpaint-Signature"])
    summary = json.loads(delivery["body"])
    assert summary["state"] == "SUCCESS" and summary["images"][0]["url"].startswith("http://127.0.0.1")
    assert SECRET not in delivery["body"].decode()
    assert SECRET not in worker.log_path.read_text() and SECRET not in marked.model_dump_json()

    blocked = stack.start_worker(f"blocked@{socket.gethostname()}", INPAINT_QUEUE="plugged",
                                 INPAINT_PLUGINS_BLOCKED="watermark,webhook", **env)
    try:
        blocked.wait_ready(client.app)
        unmarked = client.wait(client.submit(with_plugins), timeout=120)
    finally:
        blocked.stop()
    assert unmarked.state == "SUCCESS", unmarked.error
    assert np.array_equal(stored_pixels(stack, unmarked), stored_pixels(stack, plain))
    assert "watermark" not in unmarked.result.parameters.plugins
    time.sleep(2)  # a webhook would have come by now: the first one came within a second
    assert not any(json.loads(r["body"])["job_id"] == unmarked.job_id for r in received)
