"""Many dead letters at once, written by the product's own writer (workers.delivery.dead_letter, the
step that ends a refused delivery's last attempt), without the deliveries that would lead there."""

from __future__ import annotations

import copy
from typing import Any

import redis
import structlog

from receiver.chains import OrderChains
from receiver.clock import utc_now
from receiver.destination_state import DestinationState
from receiver.destinations import MERCHANT, Destination
from receiver.order import build_updates, parse_order
from receiver.rediskeys import RedisKeys
from receiver.retries import RetrySchedule
from receiver.settings import Settings
from tests.helpers import card_order
from workers.delivery import DeliveryContext, Outcomes, dead_letter


def seed_dead_letters(
    client: redis.Redis, settings: Settings, count: int, prefix: str = "Seeded", destination: str = MERCHANT,
    error: str = "merchant answered HTTP 400", http_status: int | None = 400,
) -> list[str]:  # fmt: skip
    """`count` dead letters of as many orders (`<prefix><n>`, each one update) for `destination`, their
    last attempt answered `http_status` (None: no answer) with `error`; returns their entries' ids."""
    keys = RedisKeys.of(settings)
    if destination != MERCHANT:
        keys = keys.for_destination(destination)
    target = settings.destination(destination) or Destination(destination)
    context = DeliveryContext(
        settings, client, keys, OrderChains(client, keys, settings.history_retention_seconds),
        RetrySchedule(client, keys, settings.history_retention_seconds), [],
        structlog.testing.ReturnLogger(), target, Outcomes.of(target),
        DestinationState(client, keys, settings.breaker),
    )  # fmt: skip
    [template] = build_updates(
        parse_order(card_order("TemplateOrder001")), received_at=utc_now(), verified_by="local"
    )
    ids = []
    for n in range(count):
        order_id = f"{prefix}{n:07d}"
        update: dict[str, Any] = copy.deepcopy(template)
        update.update(id=f"{order_id}-0-order", order_id=order_id, order_number=f"n-{order_id}")
        attempt = {"update": update["id"], "order": order_id, "attempt": 1, "http_status": http_status}
        dead_letter(context, update, 1, error, utc_now(), logged=attempt)
        ids.append(keys.job_id(update["id"]))
    return ids
