"""What the queues hold: how deep each queue is at each priority, where a waiting job stands, when it may start.

Jobs wait in Redis lists, one per queue and priority step (kombu's Redis transport, its default steps 0, 3, 6,
9): `<queue>` holds priorities 0-2, `<queue>\\x06\\x163` 3-5, `...6` 6-8, `...9` 9. A worker takes the next job
from the right end of the most urgent non-empty list of its queues (round robin between queues at a step): 0 is
the most urgent (the Redis way; RabbitMQ's is the other way round), and a message without a priority is a 0.
"""

from __future__ import annotations

import json
import time
from bisect import bisect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .protocol import SUBMITTED_AT, finished_key, waiting_key
from .schema import QueuePlace

PRIORITY_STEPS = (0, 3, 6, 9)
QUEUE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a queue's name
SEPARATOR = "\x06\x16"
FINISHED_KEPT = 50  # the recent job ends a queue's rate is read from
WAITING_KEPT_S = 86_400  # a job nobody took for this long leaves the index of waiting jobs

@contextmanager
def broker_redis(app: Any, fresh: bool = False) -> Iterator[Any]:
    """A Redis client of the app's broker, as kombu makes one for its own reads of the queue (Sentinel-aware; not
    the channel's `client`, which shares the connection a consumer polls on); `fresh`: a new connection, not one
    from the app's pool."""
    with app.connection_for_read() if fresh else app.pool.acquire(block=True) as connection:
        with connection.default_channel.conn_or_acquire() as client:
            yield client


def list_name(queue: str, step: int) -> str:
    return queue if step == 0 else f"{queue}{SEPARATOR}{step}"


def queue_lists(queue: str) -> list[str]:
    """A queue's lists, most urgent first."""
    return [list_name(queue, step) for step in PRIORITY_STEPS]


def step_of(priority: int) -> int:
    """The priority step (list) a priority goes to, as kombu picks it."""
    return PRIORITY_STEPS[bisect(PRIORITY_STEPS, priority) - 1]


def mark_waiting(client: Any, queue: str, priority: int, job_id: str, front: bool = False,
                 now: float | None = None) -> None:
    now = time.time() if now is None else now
    key = waiting_key(queue, step_of(priority))
    with client.pipeline(transaction=False) as pipe:
        pipe.zadd(key, {job_id: 0 if front else now})
        pipe.zremrangebyscore(key, "(0", now - WAITING_KEPT_S)
        pipe.expire(key, WAITING_KEPT_S)
        pipe.execute()


def mark_taken(client: Any, queue: str, job_id: str) -> None:
    with client.pipeline(transaction=False) as pipe:
        for step in PRIORITY_STEPS:
            pipe.zrem(waiting_key(queue, step), job_id)
        pipe.execute()


def place(broker: Any, backend: Any, queue: str, job_id: str) -> QueuePlace | None:
    """The job's place in its queue: the jobs in more urgent lists (the broker's lengths) and those sent before it
    to its own (the index of waiting jobs); None when it waits in none (not sent by submit, or taken)."""
    with backend.pipeline(transaction=False) as pipe:
        for step in PRIORITY_STEPS:
            pipe.zrank(waiting_key(queue, step), job_id)
        ranks = pipe.execute()
    found = [index for index, rank in enumerate(ranks) if rank is not None]
    if not found:
        return None
    lengths = list(depth(broker, queue).values())
    position = sum(lengths[:found[0]]) + ranks[found[0]] + 1
    pace = seconds_per_job(backend, queue)
    return QueuePlace(queue=queue, position=position, waiting=max(sum(lengths), position),
                      starts_in_s=round(position * pace, 1) if pace is not None else None)


def record_finished(client: Any, queue: str, job_id: str, now: float | None = None) -> None:
    """A job of `queue` ended (any outcome): the queue's pace is read from the last FINISHED_KEPT of these."""
    key = finished_key(queue)
    with client.pipeline(transaction=False) as pipe:
        pipe.zadd(key, {job_id: time.time() if now is None else now})
        pipe.zremrangebyrank(key, 0, -FINISHED_KEPT - 1)
        pipe.expire(key, 86_400)
        pipe.execute()


def seconds_per_job(client: Any, queue: str) -> float | None:
    """How often a job of the queue ended lately, all its workers together; None with fewer than two ends."""
    ends = [score for _, score in client.zrange(finished_key(queue), 0, -1, withscores=True)]
    if len(ends) < 2 or ends[-1] <= ends[0]:
        return None
    return (ends[-1] - ends[0]) / (len(ends) - 1)


def depth(client: Any, queue: str) -> dict[int, int]:
    """Jobs waiting in the queue, by priority step."""
    with client.pipeline(transaction=False) as pipe:
        for name in queue_lists(queue):
            pipe.llen(name)
        return dict(zip(PRIORITY_STEPS, pipe.execute(), strict=True))


def oldest_wait_s(client: Any, queue: str, now: float | None = None) -> float | None:
    """How long the longest-waiting job of the queue has waited (the next to go in each list is its oldest), by the
    `SUBMITTED_AT` header InpaintClient.submit stamps; None when no waiting job carries one."""
    now = time.time() if now is None else now
    with client.pipeline(transaction=False) as pipe:
        for name in queue_lists(queue):
            pipe.lindex(name, -1)
        heads = pipe.execute()
    waited = []
    for head in heads:
        try:
            submitted = json.loads(head)["headers"][SUBMITTED_AT]
        except (TypeError, ValueError, KeyError):
            continue
        if isinstance(submitted, int | float) and not isinstance(submitted, bool):
            waited.append(max(0.0, now - submitted))
    return round(max(waited), 3) if waited else None
