"""The benchmarks keep working: each runs once in its --quick mode (figures are for bench/, not for asserts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs each benchmark in a process of its own

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize(("command", "expected"), [
    (["preview.py", "--quick"], "preview / step"),
    (["overhead.py", "--quick"], "throughput"),
    (["auto_crop.py", "--quick"], "auto crop (80x80"),
    (["adapters.py", "--quick"], "standard / fast"),
    (["gpu.py", "--preset", "tiny", "--size", "64", "--steps", "4", "--runs", "1", "--no-compile"], "batched CFG"),
])
def test_benchmark_runs_in_quick_mode(tiny_model_dir, command, expected):
    env = {**os.environ, "INPAINT_MODEL": str(tiny_model_dir)}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / command[0]), *command[1:]], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expected in done.stdout
    if command[0] == "gpu.py":  # a variant that fails prints `failed:` and the others go on: these must not
        for row in ("fast mode (Lightning-rank LoRA", "LoRA slots of rank 64, no adapter",
                    "fast mode through the slots"):
            line = next((line for line in done.stdout.splitlines() if row in line), None)
            assert line is not None and "failed:" not in line, (row, done.stdout[-3000:])
