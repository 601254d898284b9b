"""Pyrebase4: db.child(...).stream(handler) on the document view. With auth on, the token goes
in ?auth= (Pyrebase's way); a new token means a new stream, which starts with a fresh put."""

import threading

import pyrebase

from common import BASE, PATH, SECRET, Tree, finish, report, token

tree = Tree()
connects = 0
restart = threading.Event()


def handler(message):
    event, path, data = message["event"], message.get("path"), message.get("data")
    if event == "auth_revoked":
        # The token expired: Pyrebase would reconnect with the same (expired) ?auth=, so the
        # app opens a new stream with a fresh token. It starts with a full put.
        report(terminal=event)
        restart.set()
        return
    if event == "cancel":
        report(terminal=event)
        finish()
    first = path == "/" and event == "put" and tree.root is None
    if tree.apply(event, path, data):
        tree.final(connects)
    elif first:
        report(ready=True)


firebase = pyrebase.initialize_app(
    {"apiKey": "unused", "authDomain": "unused", "databaseURL": BASE, "storageBucket": "unused"}
)
database = firebase.database()


def open_stream():
    global connects
    connects += 1
    ref = database
    for part in PATH.strip("/").split("/"):
        ref = ref.child(part)
    return ref.stream(handler, token=token())


stream = open_stream()
while SECRET:
    restart.wait()
    restart.clear()
    old, stream = stream, open_stream()
