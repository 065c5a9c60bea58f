"""RQ's storage as this product writes it: key names, the job hash, the job data, RQ's timestamps.

The receiver writes update jobs from Lua (atomically with its dedup marker), and the chain scripts move
them between RQ's lists and registries; everything they need to spell the way RQ does is taken from RQ
itself here, so RQ, `rq info` and rq-dashboard read what we write. Key names come from RQ's own classes,
which honour RQ's `RQ_KEY_PREFIX` (read by RQ from the process environment when it is imported).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from functools import cache
from typing import Any

import orjson
from redis import Redis
from rq.defaults import RQ_KEY_PREFIX
from rq.job import Job
from rq.queue import Queue
from rq.registry import DeferredJobRegistry, FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

# The job function, by its dotted name: the receiver never imports workers/ (see workers/jobs.py).
DELIVER_UPDATE = "workers.jobs.deliver_update"
JOB_TIMEOUT_SECONDS = 300
# The budget of the `Retry` a delivery attempt returns to wait for its next attempt (RQ fails the job
# after that many); our own attempt count (DELIVERY_MAX_ATTEMPTS) decides when to give up, far sooner.
RETRY_BUDGET = 1_000_000
FAILURE_TTL_SECONDS = 86400 * 30  # how long RQ keeps a dead-lettered update's job in its FailedJobRegistry

JOB_PREFIX: str = Job.redis_job_namespace_prefix
QUEUES_KEY: str = Queue.redis_queues_keys
# orjson.dumps([DELIVER_UPDATE, None, [update], {}]) is exactly JOB_DATA_HEAD + update JSON + JOB_DATA_TAIL:
# the scripts build a job's data around the update (whose copy they keep for dead-lettering) with these.
JOB_DATA_HEAD = b'["' + DELIVER_UPDATE.encode() + b'",null,['
JOB_DATA_TAIL = b"],{}]"


def queue_key(queue_name: str) -> str:
    return f"{Queue.redis_queue_namespace_prefix}{queue_name}"


def job_key(job_id: str) -> str:
    return f"{JOB_PREFIX}{job_id}"


def workers_key(queue_name: str) -> str:
    """RQ's set of the keys of the workers listening on the queue."""
    return WORKERS_BY_QUEUE_KEY % queue_name


def deferred_key(queue_name: str) -> str:
    """RQ's DeferredJobRegistry: an update waiting behind its order's head is listed here."""
    return DeferredJobRegistry.key_template.format(queue_name)


def scheduled_key(queue_name: str) -> str:
    """RQ's ScheduledJobRegistry: an update waiting for its next attempt is listed here."""
    return ScheduledJobRegistry.key_template.format(queue_name)


def failed_key(queue_name: str) -> str:
    """RQ's FailedJobRegistry: dead-lettered updates (and attempts RQ saw fail) are listed here."""
    return FailedJobRegistry.key_template.format(queue_name)


def started_key(queue_name: str) -> str:
    """RQ's StartedJobRegistry: the deliveries in flight are listed here."""
    return StartedJobRegistry.key_template.format(queue_name)


def rq_timestamp(moment: datetime | None = None) -> str:
    """RQ's own timestamp format (rq.utils.utcformat), for the job fields the scripts write."""
    # isoformat is cheaper than strftime and spells the same for a UTC moment
    return (moment or datetime.now(UTC)).isoformat(timespec="microseconds")[:-6] + "Z"


def update_json(update: Mapping[str, Any]) -> bytes:
    return orjson.dumps(update)


def job_data(update: Mapping[str, Any]) -> bytes:
    """The job's `data` as RQ's JSON serializer reads it: [function, instance, args, kwargs]."""
    return JOB_DATA_HEAD + orjson.dumps(update) + JOB_DATA_TAIL


def job_description(update_id: str) -> str:
    return f"deliver_update({update_id})"


def enqueue_options(update_id: str) -> dict[str, Any]:
    """How an update job is made: the options `Queue.enqueue` would take to write the same job as the
    scripts (tests/test_rq_contract.py holds the scripts to it)."""
    return {
        "job_id": update_id,
        "job_timeout": JOB_TIMEOUT_SECONDS,
        "result_ttl": 0,
        "failure_ttl": FAILURE_TTL_SECONDS,
        "description": job_description(update_id),
    }


@cache
def job_hash_template(queue_name: str) -> dict[str, str]:
    """The RQ job hash fields that are the same for every update job, taken from RQ itself.

    The scripts write jobs themselves, so they need the exact fields `Queue.enqueue` would write;
    asking RQ for them keeps us right across RQ versions. No `Retry` on the job: an exception ends it in
    RQ's FailedJobRegistry, where the workers' maintenance puts an attempt whose worker died (or failed
    unexpectedly) back on the queue while the update is still its order's head and not dead-lettered.
    """
    options = enqueue_options("template")
    job = Job.create(
        DELIVER_UPDATE, args=({},), id="template", connection=Redis(), serializer=JSONSerializer,
        origin=queue_name, timeout=options.pop("job_timeout"), **{k: v for k, v in options.items() if k != "job_id"},
    )  # fmt: skip
    fields = job.to_dict()
    for per_job in PER_JOB_FIELDS:
        fields.pop(per_job, None)
    return {str(k): str(v) for k, v in fields.items()}


# Written per job by the scripts (or by RQ as the job runs), never from the template.
PER_JOB_FIELDS = ("data", "status", "created_at", "enqueued_at", "description")


def template_args(queue_name: str) -> list[str]:
    """The template as a flat field, value, ... list, as the scripts' HSET takes it."""
    return [x for pair in job_hash_template(queue_name).items() for x in pair]


def lua_string(text: str | bytes) -> str:
    """A Lua string literal of any text (every byte escaped, so nothing can break out of it)."""
    raw = text.encode() if isinstance(text, str) else text
    return '"' + "".join(f"\\{byte}" for byte in raw) + '"'


def rq_key_prefix_problem(env: Mapping[str, str]) -> str | None:
    """One line when RQ_KEY_PREFIX in `env` (the environment over `.env`) is not the prefix RQ loaded:
    RQ reads it from the process environment only, so one set in `.env` alone would split the keys."""
    wanted = env.get("RQ_KEY_PREFIX", "rq")
    if wanted == RQ_KEY_PREFIX:
        return None
    return (
        f"RQ_KEY_PREFIX: {wanted!r} is not the prefix RQ loaded ({RQ_KEY_PREFIX!r}); "
        "RQ reads it from the process environment only, so set it there, not in .env"
    )
