"""The queue's protocol: what a client and a worker agree on, in Celery and in Redis (a client in another language
implements what this file says).

- The task `inpaint` takes one keyword argument, `request` (a JSON object, worker.schema.InpaintRequest); its
  task id is the job id (worker.schema.JOB_ID_PATTERN). The optional header `inpaint_submitted_at` (Unix
  seconds) times the queue wait; task events show `kwargs_summary` instead of the request.
- Task states: Celery's, with PROGRESS meta (worker.schema.Progress) while a job runs; SUCCESS, FAILURE and
  REVOKED end it.
- Redis keys beside Celery's: `inpaint:cancel:<job id>` (a cancel asked), `inpaint:submitted:<job id>`
  (`sending`, then `sent:<queue>`: a job id is enqueued once), `inpaint:running:<job id>` (the lease of the worker
  running it), `inpaint:waiting-copy:<job id>` (a copy waiting for that worker), and per queue
  `inpaint:waiting:<queue>:<step>` (the jobs submit sent that no worker took yet) and `inpaint:finished:<queue>`
  (when its last jobs ended). The scripts below change some of them atomically.
"""

from __future__ import annotations

from typing import Any

from .redaction import redacted

TASK_NAME = "inpaint"
SUBMITTED_AT = "inpaint_submitted_at"  # a header: when the job was submitted, for the queue-wait metric
TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}
KWARGSREPR_MAX = 1024  # what Flower shows of a request: a redacted summary, never the request itself
LEASE_S = 15  # a dead holder's lease lapses within this


def cancel_key(job_id: str) -> str:
    """Set by `InpaintClient.cancel`; checked before a job starts and at every denoising step."""
    return f"inpaint:cancel:{job_id}"


def submitted_key(job_id: str) -> str:
    """Claimed by `InpaintClient.submit`, so a job id is enqueued once: `sending`, then `sent`."""
    return f"inpaint:submitted:{job_id}"


def lease_key(job_id: str) -> str:
    return f"inpaint:running:{job_id}"


def waiting_copy_key(job_id: str) -> str:
    """Held (renewed each second) by a copy that waits for the worker running its job: not a dead worker's job."""
    return f"inpaint:waiting-copy:{job_id}"


def waiting_key(queue: str, step: int) -> str:
    """The jobs `InpaintClient.submit` sent to a queue's list (priority step) that no worker has taken yet, by when
    they were sent (a job put back after its worker died: first). Their places are read here, not by looking
    through the list, whose messages can be megabytes each (worker/queues.py)."""
    return f"inpaint:waiting:{queue}:{step}"


def finished_key(queue: str) -> str:
    """When the queue's last jobs ended: its pace, for a waiting job's estimated start (worker/queues.py)."""
    return f"inpaint:finished:{queue}"


def kwargs_summary(payload: dict) -> str:
    """The task's kwargs as task events show them: data: URLs by size, URLs without query, secrets hidden."""
    text = repr({"request": redacted(payload)})
    return text if len(text) <= KWARGSREPR_MAX else text[:KWARGSREPR_MAX - 3] + "..."


CLAIM_HOLD_S = 30  # how long a submit's claim lasts before its send is confirmed: a caller that died mid-send
# (a web process killed, a deploy) frees its job id after this, and a retry with the id sends the job

# Claim a job id for sending, dropping a cancel flag left for it (a cancel of an id never submitted lasts
# result_expires_s), in one step: a cancel sent once the job is claimed is kept. 1: claimed by this call;
# 2: another call is sending it now; 0: already sent (any other value: a claim of an older client).
CLAIM_SCRIPT = """
if redis.call('SET', KEYS[1], 'sending', 'NX', 'EX', ARGV[1]) then
    redis.call('DEL', KEYS[2])
    return 1
end
if redis.call('GET', KEYS[1]) == 'sending' then
    return 2
end
return 0
"""
CLAIMED, SENDING = 1, 2  # and 0: sent


# KEYS[1]: the lease; ARGV[1]: this holder's token; ARGV[2]: milliseconds. Renew a lease this holder still
# holds; 0 when it lapsed (this holder was frozen, or cut off from Redis, for LEASE_S: its job may have been put
# back in the queue, worker/requeue.py) or another holder has it.
RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
"""
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


# KEYS[1]: the task's state; ARGV: the PROGRESS state, its expiry. A report that comes late (Redis was away)
# must not replace the outcome: Celery's own store_result guards only SUCCESS, not FAILURE.
STORE_PROGRESS = """
local current = redis.call('GET', KEYS[1])
if current then
    local status = cjson.decode(current)['status']
    if status == 'SUCCESS' or status == 'FAILURE' or status == 'REVOKED' then
        return 0
    end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


def store_progress(backend: Any, job_id: str, meta: dict) -> None:
    """A job's PROGRESS meta into its task state (published to its channel), never over its outcome."""
    state = {**backend._get_result_meta(result=meta, state="PROGRESS", traceback=None, request=None),
             "task_id": job_id}
    backend.client.eval(STORE_PROGRESS, 1, backend.get_key_for_task(job_id), backend.encode(state),
                        int(backend.expires))
