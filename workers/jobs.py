"""The RQ entry point: one job per order-status update, its only argument the update itself."""

from __future__ import annotations

from typing import Any

from redis import Redis
from rq.job import Job, Retry
from rq.serializers import JSONSerializer

DELIVER_UPDATE = "workers.jobs.deliver_update"
JOB_TIMEOUT_SECONDS = 300
# RQ re-queues a job whose worker died mid-attempt (found in its StartedJobRegistry) only while the job
# has retries left; without them it parks the job in FailedJobRegistry and the update would be stuck.
# Our own attempt count (DELIVERY_MAX_ATTEMPTS, see workers.delivery) decides when to give up, so RQ's
# budget only has to be larger than any sane number of worker crashes.
RQ_RECOVERIES = 1000


def deliver_update(update: dict[str, Any]) -> None:
    """Deliver one update to the merchant: one attempt, whose outcome decides what happens next."""
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
        retry=Retry(max=RQ_RECOVERIES, interval=0),
    )  # fmt: skip
    fields = job.to_dict()
    for per_job in ("data", "status", "created_at", "enqueued_at", "description", "started_at", "ended_at"):
        fields.pop(per_job, None)
    return {str(k): str(v) for k, v in fields.items()}
