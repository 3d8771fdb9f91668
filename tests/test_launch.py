"""`inpaint-worker launch` and `submit` as an operator and a backend developer run them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import box_mask, photo, upload
from worker.launch import plan


def test_plan_pins_one_worker_per_gpu_and_names_it():
    slots = plan(["2", "5"], cpu_workers=0)
    assert [(s.node, s.env["CUDA_VISIBLE_DEVICES"]) for s in slots] == [("gpu0@%h", "2"), ("gpu1@%h", "5")]
    cpu = plan([], cpu_workers=2)
    assert [s.node for s in cpu] == ["cpu0@%h", "cpu1@%h"] and cpu[0].env["INPAINT_DEVICE"] == "cpu"


def test_each_pinned_gpu_worker_uses_its_gpu_whatever_cuda_index_inpaint_device_names(monkeypatch):
    # cuda:1 is right for one worker started by hand; a worker pinned to one GPU sees it as cuda:0 and no cuda:1
    from worker.settings import Settings

    monkeypatch.setenv("INPAINT_DEVICE", "cuda:1")
    for slot in plan(["0", "1"], cpu_workers=0):
        with monkeypatch.context() as worker:
            for name, value in slot.env.items():  # the worker's environment: launch's own plus the slot's
                worker.setenv(name, value)
            assert Settings().device == "cuda", slot.node
    for slot in plan([], cpu_workers=2):
        assert slot.env["INPAINT_DEVICE"] == "cpu" and slot.env["CUDA_VISIBLE_DEVICES"] == ""


def test_launch_refuses_metrics_ports_past_65535_before_starting_a_worker(monkeypatch, caplog):
    from worker.launch import launch
    from worker.settings import Settings

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert launch(Settings(metrics_port=65535), cpu_workers=2) == 2  # worker 1 would need port 65536 and crash-loop
    assert "INPAINT_METRICS_PORT=65535" in caplog.text and "up to 65536" in caplog.text


def test_visible_gpus_respects_cuda_visible_devices(monkeypatch):
    from worker.launch import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert visible_gpus() == ["3", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


# Stand-ins for worker processes, started by the real launch loop: cpu0 crashes at once every time (its backoff grows
# to 8 s), cpu1 runs 10 s, exits once, and then runs until stopped. Each notes when it starts and ends.
SUPERVISED = """
import os, sys, time
from pathlib import Path
import worker.launch as launch
from worker.settings import Settings

journal = Path(sys.argv[1])
def note(*words):
    with journal.open("a") as f:
        f.write(" ".join(map(str, words)) + "\\n")
STANDIN = (
    "import signal, sys, time; from pathlib import Path; note = lambda *w: Path(sys.argv[1]).open('a').write("
    "' '.join(map(str, w)) + chr(10)); node = sys.argv[2]; note('start', node, time.monotonic()); "
    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
    "crashed = Path(sys.argv[1] + '.' + node[:4] + '-crashed'); "
    "time.sleep(0 if node.startswith('cpu0') else 600 if crashed.exists() else 10); crashed.touch(); "
    "note('exit', node, time.monotonic()); sys.exit(1)")
launch.worker_command = lambda node, queue, quiet=False: [sys.executable, "-c", STANDIN, str(journal), node]
launch.visible_gpus = lambda: []
sys.exit(launch.launch(Settings(), cpu_workers=2))
"""


@pytest.mark.slow
def test_a_crash_looping_worker_does_not_hold_up_restarting_another_nor_the_shutdown(tmp_path):
    journal = tmp_path / "journal"
    launcher = subprocess.Popen([sys.executable, "-c", SUPERVISED, str(journal)], cwd=Path(__file__).parent.parent,
                                env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while journal.read_text().count("start cpu1") < 2 if journal.exists() else True:
            assert time.monotonic() < deadline and launcher.poll() is None, "cpu1 was not started again"
            time.sleep(0.1)
        events = [line.split() for line in journal.read_text().splitlines()]
        exited = next(float(t) for kind, node, t in events if kind == "exit" and node.startswith("cpu1"))
        again = [float(t) for kind, node, t in events if kind == "start" and node.startswith("cpu1")][1]
        assert again - exited < 3, f"cpu1 started {again - exited:.1f} s after it exited (its backoff is 1 s)"
        launcher.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        assert launcher.wait(timeout=30) == 0
        assert time.monotonic() - stopping < 3, "launch sat out a backoff before it stopped"
    finally:
        launcher.kill()
        launcher.wait()


@pytest.mark.slow
def test_two_cpu_workers_both_take_jobs_and_stop_warmly(stack, worker_env, tmp_path):
    from worker.app import make_app
    from worker.client import InpaintClient

    client = InpaintClient(make_app(stack.settings(queue="launch")))
    env = {**os.environ, **stack.env(INPAINT_QUEUE="launch"), **worker_env, "CUDA_VISIBLE_DEVICES": "",
           "INPAINT_WARMUP": "on", "INPAINT_WARMUP_SIZE": "64"}
    with open(tmp_path / "launch.log", "wb") as log:
        launcher = subprocess.Popen([sys.executable, "-m", "worker.cli", "launch", "--cpu-workers", "2"], env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while len(client.app.control.ping(timeout=0.5)) < 2 and time.monotonic() < deadline:
            assert launcher.poll() is None, (tmp_path / "launch.log").read_text()
        image, mask = upload(stack, "launch/photo.png", photo()), upload(stack, "launch/mask.png", box_mask())
        jobs = [client.submit({"prompt": "a pear", "image": image, "mask_image": mask, "num_inference_steps": 8,
                               "strength": 1.0, "plugins": {"testkit": {"step_s": 0.1}}}) for _ in range(6)]
        statuses = [client.wait(job_id, timeout=120) for job_id in jobs]
        assert all(s.state == "SUCCESS" for s in statuses), [s.error for s in statuses]
        nodes = {s.result.worker["node"].split("@")[0] for s in statuses}
        assert nodes == {"cpu0", "cpu1"}
        assert all(s.result.model["warmup_s"] > 0 for s in statuses)  # each warmed up before its first job
        # a crashed worker is restarted
        stats = client.app.control.inspect(timeout=2).stats()
        crashed = next(node for node in stats if node.startswith("cpu1@"))
        os.kill(stats[crashed]["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            again = client.app.control.inspect(timeout=1).stats() or {}
            if crashed in again and again[crashed]["pid"] != stats[crashed]["pid"]:
                break
        else:
            raise AssertionError(f"{crashed} was not restarted: {(tmp_path / 'launch.log').read_text()[-3000:]}")
        # SIGTERM: a running job finishes, then everything exits
        running = client.submit({"prompt": "a plum", "image": image, "mask_image": mask, "num_inference_steps": 20,
                                 "strength": 1.0, "plugins": {"testkit": {"step_s": 0.1}}})
        while not (client.status(running).progress or client.status(running).done):
            time.sleep(0.05)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=120) == 0
        assert client.status(running).state == "SUCCESS"
    finally:
        if launcher.poll() is None:
            launcher.kill()


@pytest.mark.slow
def test_submit_follows_progress_and_prints_the_result(stack, worker, tmp_path):
    photo().save(tmp_path / "photo.png")
    box_mask().save(tmp_path / "mask.png")
    env = {**os.environ, **stack.env()}
    done = subprocess.run([sys.executable, "-m", "worker.cli", "submit", "--image", str(tmp_path / "photo.png"),
                           "--mask", str(tmp_path / "mask.png"), "--prompt", "a fig", "--set", "num_inference_steps=6",
                           "--set", "strength=1.0", "--set", 'plugins={"testkit": {"step_s": 0.05}}'],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "6/6" in done.stderr
    import json

    status = json.loads(done.stdout)
    assert status["state"] == "SUCCESS" and status["result"]["images"][0]["url"].startswith("http://127.0.0.1")


@pytest.mark.slow
def test_up_demo_runs_the_whole_stack_and_stops_it(tiny_model_dir, tmp_path):
    photo(96, 64).save(tmp_path / "photo.png")
    box_mask(96, 64).save(tmp_path / "mask.png")
    env = {**os.environ, "INPAINT_MODEL": str(tiny_model_dir)}
    done = subprocess.run([sys.executable, "-m", "worker.cli", "up", "--demo", "--image", str(tmp_path / "photo.png"),
                           "--mask", str(tmp_path / "mask.png"), "--set", "num_inference_steps=4"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stopping the stack" in done.stderr
    from PIL import Image

    assert Image.open(tmp_path / "photo.inpainted-0.png").size == (96, 64)
    import re
    import socket

    ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", done.stderr.split("starting worker")[0])]
    assert len(ports) == 2  # redis and S3: both stopped with the stack
    for port in ports:
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("quiet", [False, True])
def test_the_worker_command_is_one_celery_takes(quiet):
    from worker.launch import worker_command

    done = subprocess.run([*worker_command("w1@host", "inpaint", quiet=quiet), "--help"], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr  # "--quiet" after "worker": No such option, and every worker exits


def test_launch_logs_in_the_workers_format():
    clean = {key: value for key, value in os.environ.items() if not key.startswith("INPAINT_")}
    done = subprocess.run([sys.executable, "-m", "worker.cli", "launch"], cwd=Path(__file__).parent.parent,
                          env={**clean, "CUDA_VISIBLE_DEVICES": "", "INPAINT_LOG_FORMAT": "json"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    [line] = [json.loads(line) for line in done.stderr.splitlines()]  # one JSON object, no text line
    assert line["level"] == "ERROR" and line["logger"] == "worker.launch" and "no GPU found" in line["message"]
