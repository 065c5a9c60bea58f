"""The RQ entry point: one job per order-status update, its only argument the update itself.

The job hash, its data and its function's dotted name are receiver/rqstore.py's (the receiver writes the
jobs); this module is only what RQ imports to run one.
"""

from __future__ import annotations

from typing import Any


def deliver_update(update: dict[str, Any]) -> None:
    """Deliver one update to the merchant: one attempt, whose outcome decides what happens next."""
    from workers.delivery import deliver_from_job

    deliver_from_job(update)
