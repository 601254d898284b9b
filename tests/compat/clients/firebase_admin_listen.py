"""firebase-admin (Google's Python SDK): Reference.listen() on the document view, with
Streamgate standing in for the Realtime Database emulator (an http:// databaseURL with ?ns=,
which makes the SDK send `Authorization: Bearer owner` and `?ns=` on every request)."""

import firebase_admin
import firebase_admin.exceptions
from firebase_admin import db

from common import BASE, PATH, END, Tree, finish, report

tree = Tree()


def on_event(event):
    # put/patch carry {"path","data"}; cancel/auth_revoked carry Streamgate's {code,message},
    # which event.data (the "data" member) does not have: tell them apart by event_type first.
    if event.event_type in ("cancel", "auth_revoked"):
        report(terminal=event.event_type)
        finish()
    first = tree.root is None and event.path == "/"
    if tree.apply(event.event_type, event.path, event.data):
        tree.final()
    elif first:
        report(ready=True)


app = firebase_admin.initialize_app(options={"databaseURL": f"{BASE}/?ns=compat"})
try:
    db.reference(PATH).listen(on_event)
except firebase_admin.exceptions.FirebaseError as error:
    # Auth on: the emulator credential is refused before the stream starts.
    report(refused=str(error))
    finish()
