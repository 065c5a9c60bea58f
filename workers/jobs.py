"""The RQ entry point: one job per order-status update, its only argument the update itself."""

from __future__ import annotations

from typing import Any

from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

DELIVER_UPDATE = "workers.jobs.deliver_update"
JOB_TIMEOUT_SECONDS = 300


def deliver_update(update: dict[str, Any]) -> None:
    """Deliver one update to the merchant (wired to workers.delivery by the worker)."""
    from workers.delivery import deliver_from_job

    deliver_from_job(update)


def job_hash_template(queue_name: str) -> dict[str, str]:
    """The RQ job hash fields that are the same for every update job, taken from RQ itself.

    The receiver writes jobs from a Lua script (atomically with the dedup marker), so it needs the
    exact fields `Queue.enqueue` would write; asking RQ for them keeps us right across RQ versions.
    """
    job = Job.create(
        DELIVER_UPDATE, args=({},), id="template", connection=Redis(), serializer=JSONSerializer,
        timeout=JOB_TIMEOUT_SECONDS, result_ttl=0, failure_ttl=86400 * 30, origin=queue_name,
    )  # fmt: skip
    fields = job.to_dict()
    for per_job in ("data", "status", "created_at", "enqueued_at", "description", "started_at", "ended_at"):
        fields.pop(per_job, None)
    return {str(k): str(v) for k, v in fields.items()}
