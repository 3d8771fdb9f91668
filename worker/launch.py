"""One Celery worker process per GPU, each pinned with CUDA_VISIBLE_DEVICES, restarted if it crashes.

Pool `threads` with concurrency 1: the job runs in a thread, so the main thread keeps
sending heartbeats and answering remote control during a long job (`solo` does not),
and nothing forks after CUDA is up (`prefork` would). Measured in tests/test_queue.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from .settings import Settings

log = logging.getLogger(__name__)
POOL = "threads"


@dataclass
class Slot:
    node: str
    env: dict[str, str]
    process: subprocess.Popen | None = None
    started: float = 0.0
    backoff_s: float = 1.0
    restart_at: float | None = None  # when a worker that exited starts again


def visible_gpus() -> list[str]:
    """GPU ids to pin workers to: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [gpu.strip() for gpu in visible.split(",") if gpu.strip() and gpu.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    done = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                          text=True, timeout=30)
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def worker_command(node: str, queue: str, quiet: bool = False) -> list[str]:
    """`quiet`: without Celery's start-up banner (text on stdout), for JSON logs (a global option of celery's)."""
    return [sys.executable, "-m", "celery", "-A", "worker.app", *(["--quiet"] if quiet else []), "worker", "--pool",
            POOL, "--concurrency", "1", "--hostname", node, "--queues", queue, "--task-events"]


def plan(gpus: list[str], cpu_workers: int, metrics_port: int | None = None) -> list[Slot]:
    if gpus:  # a pinned worker sees only its GPU, as cuda:0: an INPAINT_DEVICE of cuda:1 would name none there
        slots = [Slot(f"gpu{i}@%h", {"CUDA_VISIBLE_DEVICES": gpu, "INPAINT_DEVICE": "cuda"})
                 for i, gpu in enumerate(gpus)]
    else:  # CPU workers share the cores instead of each starting a thread per core
        threads = str(max(1, (os.cpu_count() or 1) // max(1, cpu_workers)))
        slots = [Slot(f"cpu{i}@%h", {"CUDA_VISIBLE_DEVICES": "", "INPAINT_DEVICE": "cpu", "OMP_NUM_THREADS": threads})
                 for i in range(cpu_workers)]
    for i, slot in enumerate(slots):  # one metrics port per worker process
        if metrics_port:
            slot.env["INPAINT_METRICS_PORT"] = str(metrics_port + i)
    return slots


def launch(settings: Settings, cpu_workers: int = 0, max_backoff_s: float = 60.0, queues: list[str] | None = None
           ) -> int:
    """Start the workers, taking jobs from `queues` (default: INPAINT_QUEUE), and supervise them until
    SIGTERM/SIGINT, which is passed on for a warm shutdown."""
    queue = ",".join(queues or [settings.queue])
    slots = plan(visible_gpus(), cpu_workers, settings.metrics_port)
    if not slots:
        log.error("no GPU found (CUDA_VISIBLE_DEVICES, nvidia-smi); use --cpu-workers N to run on the CPU")
        return 2
    if settings.metrics_port and settings.metrics_port + len(slots) - 1 > 65535:
        log.error("INPAINT_METRICS_PORT=%d: worker i serves metrics on this port + i, and %d workers need ports up "
                  "to %d (at most 65535)", settings.metrics_port, len(slots), settings.metrics_port + len(slots) - 1)
        return 2
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        log.info("signal %d: warm shutdown, running jobs finish first", signum)
        for slot in slots:
            if slot.process and slot.process.poll() is None:
                slot.process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for slot in slots:
        start(slot, settings, queue)
    while not stopping:
        for slot in slots:  # each on its own clock: one worker's backoff never holds up another's restart
            now = time.monotonic()
            if slot.restart_at is not None:
                if now >= slot.restart_at and not stopping:
                    slot.restart_at = None
                    start(slot, settings, queue)
                continue
            code = slot.process.poll()
            if code is None or stopping:
                continue
            if now - slot.started > 60:  # it ran a while: the crash is not a start-up loop
                slot.backoff_s = 1.0
            log.warning("worker %s exited with %s; restarting in %.0f s", slot.node, code, slot.backoff_s)
            slot.restart_at = now + slot.backoff_s
            slot.backoff_s = min(slot.backoff_s * 2, max_backoff_s)
        time.sleep(0.2)
    for slot in slots:
        slot.process.wait()
    return 0


def start(slot: Slot, settings: Settings, queue: str) -> None:
    slot.process = subprocess.Popen(worker_command(slot.node, queue, quiet=settings.log_format == "json"),
                                    env={**os.environ, **slot.env})
    slot.started = time.monotonic()
    log.info("started worker %s (pid %d, %s)", slot.node, slot.process.pid, slot.env)
