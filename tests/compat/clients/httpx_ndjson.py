"""NDJSON over httpx streaming (Accept: application/x-ndjson): one envelope per line, an empty
line as keep-alive; reconnects with ?lastEventId= (or Last-Event-ID) after a drop."""

import json
import time

import httpx

from common import BASE, PATH, Changes, token

changes = Changes()
with httpx.Client(timeout=httpx.Timeout(5.0, read=30.0)) as client:
    while True:
        headers = {"Accept": "application/x-ndjson"}
        if changes.last_id:
            headers["Last-Event-ID"] = changes.last_id
        if (t := token()):
            headers["Authorization"] = f"Bearer {t}"
        changes.connects += 1
        try:
            with client.stream("GET", f"{BASE}{PATH}?snapshot=true", headers=headers) as response:
                if response.status_code == 200:
                    for line in response.iter_lines():
                        if not line.strip():
                            continue
                        envelope = json.loads(line)
                        if changes.apply(envelope["event"], envelope.get("id"), envelope.get("data")):
                            changes.final()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
