"""websockets (Python): the WebSocket transport, one envelope per text message. The library
does not resume: the loop reconnects with Last-Event-ID (a header websockets can send, unlike
a browser) and a fresh token."""

import asyncio
import json

import websockets

from common import BASE, PATH, Changes, token

changes = Changes()


async def main():
    url = BASE.replace("http://", "ws://") + PATH + "?snapshot=true"
    while True:
        headers = {}
        if changes.last_id:
            headers["Last-Event-ID"] = changes.last_id
        if (t := token()):
            headers["Authorization"] = f"Bearer {t}"
        changes.connects += 1
        try:
            async with websockets.connect(url, additional_headers=headers, open_timeout=5) as ws:
                async for message in ws:
                    envelope = json.loads(message)
                    if changes.apply(envelope["event"], envelope.get("id"), envelope.get("data")):
                        changes.final()
        except (OSError, websockets.exceptions.WebSocketException, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.5)


asyncio.run(main())
