"""The ceiling: a bare aiohttp app that reads the body and answers 200. `python -m bench.bare PORT`"""

from __future__ import annotations

import sys

from aiohttp import web


async def accept(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b'{"status":"accepted"}', content_type="application/json")


def main() -> None:
    app = web.Application(client_max_size=262_144)
    app.router.add_post("/callbacks/intergiro", accept)
    app.router.add_get("/healthz", accept)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
