"""The merchant's side, played locally by `dev`: verify each delivery's Standard Webhooks signature and
print the update."""

from __future__ import annotations

import orjson
from aiohttp import web

SINK_PATH = "/webhooks/intergiro"


def say(line: str) -> None:
    print(line, flush=True)


def sink_app(secret: str) -> web.Application:
    """The merchant's side, played locally: verify the Standard Webhooks signature, print the update."""
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    webhook = Webhook(secret)

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            webhook.verify(body, {k.lower(): v for k, v in request.headers.items()})
        except WebhookVerificationError as exc:
            say(f"sink: refused an update with a bad signature ({exc})")
            return web.json_response({"error": "bad signature"}, status=400)
        update = orjson.loads(body)
        event = update.get("event", {})
        say(
            f"sink: received {update.get('id')} order={update.get('order_id')} "
            f"event={event.get('type')} status={update.get('status')} statuses={update.get('statuses')} "
            f"(signature ok, Idempotency-Key {request.headers.get('Idempotency-Key')})"
        )
        return web.json_response({"received": update.get("id")})

    app = web.Application()
    app.router.add_post(SINK_PATH, receive)
    return app
