"""What every Python client of the compatibility suite shares: its settings (environment,
set by tests/compat/run.mjs), the state it rebuilds, and the lines it reports on stdout.

A client prints one JSON object per line: {"ready": true} once it holds the initial state,
{"final": {...}, ...} when the writer's end marker (_id "~end") arrives, {"terminal": name}
for the event that ends the stream; then it exits. Nothing here checks anything: run.mjs
compares the reports with the collection.
"""

import base64
import hashlib
import hmac
import json
import os
import sys
import time

BASE = os.environ["SG_URL"]  # http://127.0.0.1:PORT
PATH = os.environ["SG_PATH"]  # /db/coll/_streams/name
SECRET = os.environ.get("SG_SECRET")  # auth on: HS256 tokens minted here
TOKEN_SECS = int(os.environ.get("SG_TOKEN_SECS", "3"))
END = "~end"


def token():
    """A fresh HS256 JWT (role reader), as an app would get from its auth server."""
    if not SECRET:
        return None

    def b64(value):
        raw = json.dumps(value, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    body = b64({"alg": "HS256", "typ": "JWT"}) + "." + b64(
        {"sub": "compat", "roles": ["reader"], "aud": "streamgate", "exp": int(time.time()) + TOKEN_SECS + 1}
    )
    sig = hmac.new(SECRET.encode(), body.encode(), hashlib.sha256).digest()
    return body + "." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()


def report(**fields):
    sys.stdout.write(json.dumps(fields, sort_keys=True) + "\n")
    sys.stdout.flush()


def finish(code=0):
    """Leaves at once, listener threads and all (the SDKs' threads are not daemons)."""
    sys.stdout.flush()
    os._exit(code)


class Changes:
    """A collection rebuilt from change events (enveloped SSE data, NDJSON/WebSocket
    envelopes): snapshot events and inserts/replaces/updates set the full document, deletes
    remove it. Change ids are kept to show every change arrived once, in order."""

    def __init__(self):
        self.docs = {}
        self.ids = []
        self.connects = 0
        self.last_id = None

    def apply(self, name, event_id, data):
        """Applies one event; True when the end marker arrived."""
        if name in ("snapshot", "change"):
            key = json.dumps(data["documentKey"]["_id"])
            if data["operationType"] == "delete":
                self.docs.pop(key, None)
            elif data.get("fullDocument") is not None:
                self.docs[key] = data["fullDocument"]
            if event_id:
                self.last_id = event_id
            if name == "change":
                self.ids.append(event_id)
                if data["documentKey"]["_id"] == END:
                    self.docs.pop(key, None)
                    return True
        elif name == "ready":
            report(ready=True)
        elif name in ("cancel", "auth_revoked", "error", "invalidate"):
            report(terminal=name, data=data)
            if name != "auth_revoked":
                finish()
        return False

    def final(self):
        report(
            final={json.loads(k) if k.startswith('"') else k: v for k, v in self.docs.items()},
            changes=len(self.ids),
            ordered=all(a < b for a, b in zip(self.ids, self.ids[1:])),
            connects=self.connects,
        )


class Tree:
    """A Firebase client's JSON tree: `put` replaces the value at a path, `patch` each child
    path of its data, `null` deletes."""

    def __init__(self):
        self.root = None
        self.events = 0

    def apply(self, name, path, data):
        """Applies a put/patch; True when the end marker arrived (alone or in a full put)."""
        if name == "put":
            self.set(segments(path), data)
        elif name == "patch":
            for child, value in data.items():
                self.set(segments(path) + segments(child), value)
        else:
            return False
        self.events += 1
        # The end marker arrives as its own put, or, for a stream opened after it was written
        # (an app that renews its token opens a new stream), inside the new stream's full put.
        return path == "/" + END or (path == "/" and isinstance(data, dict) and END in data)

    def set(self, at, value):
        if not at:
            self.root = value
            return
        if not isinstance(self.root, dict):
            self.root = {}
        node = self.root
        for name in at[:-1]:
            if not isinstance(node.get(name), dict):
                node[name] = {}
            node = node[name]
        if value is None:
            node.pop(at[-1], None)
        else:
            node[at[-1]] = value
        prune(self.root)

    def final(self, connects=0):
        docs = {k: v for k, v in (self.root or {}).items() if k != END}
        # The first put is not a change: the rest are, one event each.
        report(final=docs, changes=self.events - 1, ordered=True, connects=connects)


def segments(path):
    return [s for s in path.split("/") if s]


def prune(node):
    """Firebase has no empty objects: a child emptied by a null goes too."""
    if isinstance(node, dict):
        for key in [k for k, v in node.items() if isinstance(v, dict) and not prune(v)]:
            del node[key]
        return node
    return node
