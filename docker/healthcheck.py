"""Container HEALTHCHECK for `inpaint-worker launch`: healthy when every worker of this container answers a ping.

The workers are the ones `launch` starts: `gpu{i}@{hostname}` for each visible GPU (the same discovery as `launch`:
CUDA_VISIBLE_DEVICES, else nvidia-smi), all of which must answer; on a host without GPUs (`launch --cpu-workers N`)
at least one `cpu*@{hostname}` must. The ping is addressed to this container's nodes only (by name, or by a glob on
the node name), so a fleet of containers does not make every worker answer every container's check.

Why a ping and not `pgrep -f "celery worker"`: `launch` already restarts a worker process that exits, so a process
check says little; a ping also fails for a worker that lost the broker, is stuck, or is still loading the model (a
worker answers only once its pipeline is loaded). A job does not block it: jobs run in a thread, pings are answered
by the main thread (tests/test_queue.py).

Exit status 0 healthy, 1 not (Docker's convention); one line on stdout says why (shown by `docker inspect`).
"""

from __future__ import annotations

import argparse
import re
import socket
import sys

CREDENTIALS_IN_URL = re.compile(r"(://)[^/@\s]*@")


def expected(hostname: str) -> tuple[list[str], str | None]:
    """Node names that must all answer, or (for CPU workers, whose number is not known here) a glob one must match."""
    from worker.launch import plan, visible_gpus

    gpus = visible_gpus()
    if gpus:
        return [slot.node.replace("%h", hostname) for slot in plan(gpus, cpu_workers=0)], None
    return [], f"cpu*@{hostname}"


def check(timeout: float, hostname: str | None = None) -> tuple[bool, str]:
    hostname = hostname or socket.gethostname()
    try:
        nodes, pattern = expected(hostname)
        from worker.app import app

        if nodes:
            replies = app.control.ping(destination=nodes, timeout=timeout)
        else:
            replies = app.control.ping(timeout=timeout, pattern=pattern, matcher="glob")
    except Exception as error:  # broker unreachable, wrong password, invalid settings
        message = CREDENTIALS_IN_URL.sub(r"\1***@", f"{type(error).__name__}: {error}")
        return False, f"unhealthy: cannot ping the workers: {message}"
    answered = sorted(node for reply in replies for node in reply)
    if nodes:
        missing = [node for node in nodes if node not in answered]
        if missing:
            return False, f"unhealthy: no answer within {timeout:g} s from {', '.join(missing)}"
        return True, f"healthy: {', '.join(nodes)} answered"
    if not answered:
        return False, f"unhealthy: no GPU visible and no worker {pattern} answered within {timeout:g} s"
    return True, f"healthy: {', '.join(answered)} answered"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answers (default 10)")
    parser.add_argument("--hostname", help="the %%h of the node names (default: this container's hostname)")
    args = parser.parse_args(argv)
    healthy, message = check(args.timeout, args.hostname)
    print(message, flush=True)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
