"""The alias history of a registered model: every registration (-> challenger), promotion (-> champion, forced
or not) and refused promotion, with who / when / from / to / why. Each event is one registered-model tag
`smitin.history.<ms>.<rand>` holding JSON, so events are written atomically, never rewrite each other, and show
in the MLflow UI on the model's page."""

from __future__ import annotations

import getpass
import json
import os
import secrets
import socket
import time
from datetime import UTC, datetime

HISTORY_PREFIX = "smitin.history."


def who() -> str:
    user = os.environ.get("SMITIN_USER")
    if not user:
        try:
            user = getpass.getuser()
        except Exception:  # noqa: BLE001 - no passwd entry in some containers
            user = "unknown"
        user = f"{user}@{socket.gethostname()}"
    return user


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def record_event(client, name: str, event: dict) -> dict:
    """Write one event; the returned dict carries its tag key as `key` (to undo it in a rollback). Called under the
    registry lock: the key's time is after every event already there, so the history stays in the order the
    events happened even when the writers' clocks disagree (two machines sharing a server)."""
    event = {"when": now_iso(), "who": who(), **event}
    ms = max(int(time.time() * 1000), _last_ms(client, name) + 1)
    key = f"{HISTORY_PREFIX}{ms:013d}.{secrets.token_hex(3)}"
    client.set_registered_model_tag(name, key, json.dumps(event, sort_keys=True))
    return {**event, "key": key}


def _last_ms(client, name: str) -> int:
    return max((_key_ms(k) for k in client.get_registered_model(name).tags if k.startswith(HISTORY_PREFIX)), default=0)


def _key_ms(key: str) -> int:
    try:
        return int(key[len(HISTORY_PREFIX) :].split(".")[0])
    except ValueError:  # a tag someone wrote by hand
        return 0


def read_history(client, name: str) -> list[dict]:
    rm = client.get_registered_model(name)
    events = []
    for key, value in sorted(rm.tags.items()):
        if key.startswith(HISTORY_PREFIX):
            try:
                events.append(json.loads(value))
            except ValueError:
                events.append({"action": "unreadable", "why": value[:80]})
    return events
