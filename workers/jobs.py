"""The RQ entry point: one job per order-status update, its only argument the update itself.

The job hash, its data and its function's dotted name are receiver/rqstore.py's (the receiver writes the
jobs); this module is only what RQ imports to run one.
"""

from __future__ import annotations

from typing import Any

from rq.job import Retry


def deliver_update(update: dict[str, Any]) -> Retry | None:
    """Deliver one update to the merchant: one attempt, whose outcome decides what happens next
    (None: done; a `Retry`: RQ holds the job as scheduled; DeadLettered raised: RQ records it failed)."""
    from workers.delivery import deliver_from_job

    return deliver_from_job(update)
