"""httpx-sse: SSE over httpx. It parses events but does not reconnect: the loop below does,
sending Last-Event-ID (and a fresh token) each time."""

import time

import httpx
from httpx_sse import connect_sse

from common import BASE, PATH, Changes, finish, token
import json

changes = Changes()
with httpx.Client(timeout=httpx.Timeout(5.0, read=30.0)) as client:
    while True:
        headers = {}
        if changes.last_id:
            headers["Last-Event-ID"] = changes.last_id
        if (t := token()) :
            headers["Authorization"] = f"Bearer {t}"
        changes.connects += 1
        try:
            with connect_sse(client, "GET", f"{BASE}{PATH}?snapshot=true", headers=headers) as source:
                for sse in source.iter_sse():
                    if sse.event in ("info", "heartbeat") or not sse.data:
                        continue
                    if changes.apply(sse.event, sse.id or None, json.loads(sse.data)):
                        changes.final()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
