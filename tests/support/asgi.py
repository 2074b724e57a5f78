"""The plumbing the fake engines share: pure ASGI, so that they see client disconnects exactly."""
from __future__ import annotations

import asyncio
import json


async def lifespan(receive, send) -> None:
    while (msg := await receive())["type"] != "lifespan.shutdown":
        await send({"type": msg["type"] + ".complete"})
    await send({"type": "lifespan.shutdown.complete"})


async def read_json(receive):
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            return json.loads(body)


async def send_json(send, status: int, body: dict) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def watch_disconnect(receive) -> tuple[asyncio.Event, asyncio.Future]:
    """An event set when the client goes away, and the task that watches (cancel it when done)."""
    gone = asyncio.Event()

    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    return gone, asyncio.ensure_future(watch())
