"""Log lines for machines: with --log-format=json every record on stderr is
one JSON object on one line, with the time, level, service, logger, event
and message, and the ids a call site passes in `extra=` (client, snapshot
tag, request id, chunk range, ...). The text format stays the default.
Every field is listed in FIELDS and in docs/operations.md, "Logs".
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

__all__ = ["FIELDS", "ID_FIELDS", "NO_EVENT", "JsonFormatter", "TEXT_FORMAT", "chunk_range"]

#: The text format: time, logger, level, message.
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

#: The event of a line whose call site names none.
NO_EVENT = "log"

#: Ids a call site may attach with `extra=`; each appears only when given.
ID_FIELDS: dict[str, str] = {
    "connection": "number of the connection within this service",
    "peer": "address of the other end of the connection",
    "role": "what the peer said it is: client, admin or server",
    "client": "the client's id, as hexadecimal text",
    "snapshot": "snapshot tag",
    "request": "request id (csnapd) or NBD cookie (csnap-nbd)",
    "chunks": "chunk range [first, last], both included",
    "export": "NBD export name",
    "address": "address listened on, or of the server the line is about",
    "agent": "the agent's socket",
    "store": "the snapshot store's path",
    "transactions": "journal transactions replayed",
    "locks": "read locks released, in chunks",
    "barrier": "snapshot barrier number",
    "token": "fencing token (the etcd revision of an election)",
    "node": "cluster node name",
    "reason": "why a peer was refused",
    "directory": "a directory the service made or uses",
}

#: Every field a JSON line may have, in the order they are written.
FIELDS: tuple[str, ...] = (
    "time",
    "level",
    "service",
    "logger",
    "event",
    "message",
    *ID_FIELDS,
    "error",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record; see FIELDS."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _timestamp(record.created),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "event": getattr(record, "event", None) or NO_EVENT,
            "message": record.getMessage(),
        }
        for name in ID_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        elif record.stack_info:
            line["error"] = self.formatStack(record.stack_info)
        # default=str: an id of a type JSON lacks (a path, an enum) as its text.
        return json.dumps(line, default=str)


def chunk_range(offset: int, length: int, chunk_size: int) -> list[int] | None:
    """The `chunks` field of a byte range: [first, last] chunk, None when empty."""
    if length <= 0:
        return None
    return [offset // chunk_size, (offset + length - 1) // chunk_size]


def _timestamp(created: float) -> str:
    """RFC 3339 UTC with milliseconds: 2026-01-31T12:00:00.123Z."""
    when = datetime.fromtimestamp(created, UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
