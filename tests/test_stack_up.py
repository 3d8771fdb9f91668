"""`inpaint-worker up` (make up): what it prints works when pasted into a shell that has no virtual environment."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support import box_mask, photo

ROOT = Path(__file__).resolve().parent.parent
BARE_PATH = "/usr/local/bin:/usr/bin:/bin"  # what a new shell has: no .venv/bin


def lines_until(process: subprocess.Popen, end: str, timeout: float) -> list[str]:
    """stderr's lines up to the one containing `end`."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            seen.append(lines.get(timeout=1).rstrip("\n"))
        except queue.Empty:
            assert process.poll() is None, "\n".join(seen)
            continue
        if end in seen[-1]:
            return seen
    raise AssertionError("up did not finish starting:\n" + "\n".join(seen))


@pytest.mark.slow
def test_up_prints_commands_ready_to_paste_and_the_metrics_url(tiny_model_dir, tmp_path):
    for name, image in (("photo.png", photo()), ("mask.png", box_mask())):
        image.save(tmp_path / name)
    env = {**os.environ, "INPAINT_MODEL": str(tiny_model_dir)}
    up = subprocess.Popen([sys.executable, "-m", "worker.cli", "up", "--image", "photo.png", "--mask", "mask.png",
                           "--prompt", "a barn's red door"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    try:
        printed = lines_until(up, "Ctrl-C stops everything", timeout=240)
        text = "\n".join(printed)
        metrics = re.search(r"^metrics: (http://127\.0\.0\.1:\d+/metrics)", text, re.M)
        assert metrics, text
        with urllib.request.urlopen(metrics.group(1), timeout=10) as response:
            assert b"inpaint_jobs_total" in response.read()
        if "Flower" in text:
            assert re.search(r"^Flower:  http://127\.0\.0\.1:\d+ ", text, re.M), text

        export = next(line.strip() for line in printed if line.strip().startswith("export "))
        submit = next(line.strip() for line in printed if " submit " in line)
        program = submit.split()[0]
        assert Path(program).is_absolute() and os.access(program, os.X_OK), submit
        assert f"--image {tmp_path / 'photo.png'} --mask {tmp_path / 'mask.png'}" in submit
        # pasted as printed, from another directory, in a shell whose PATH has no .venv/bin
        shell_env = {k: v for k, v in os.environ.items() if not k.startswith(("INPAINT_", "AWS_", "VIRTUAL_ENV"))}
        done = subprocess.run(["bash", "-c", f"{export}\n{submit} --set num_inference_steps=2 --timeout 120"],
                              cwd="/", env={**shell_env, "PATH": BARE_PATH}, capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        status = json.loads(done.stdout)
        assert status["state"] == "SUCCESS" and status["result"]["worker"]["node"].startswith("local@")
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(10)
    assert up.returncode == 0
