"""The server's opt-in audit log (`serve --audit-log FILE`): one JSON line per search.

Each line says who searched, with what, and what they were shown, but holds no image: the time
(UTC), the client's address, the token's identity (the first 12 hex digits of its sha256; the
token itself is never written), the sha256 of each uploaded file, the liked and disliked ids, the
filter, the search parameters, and the ids returned in rank order. Lines are appended and flushed
one at a time, so a crash loses at most the line being written.
"""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from generation.errors import InputError


def token_identity(token: str | None) -> str | None:
    """A short name for a token that does not reveal it."""
    return hashlib.sha256(token.encode()).hexdigest()[:12] if token else None


class AuditLog:
    """Appends search records to a JSON-lines file; safe to call from several threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a folder; give --audit-log a file to append to")
        try:
            self._file = self.path.open("a", encoding="utf-8")
        except OSError as error:
            raise InputError(f"{self.path}: cannot append the audit log ({error.strerror}); check the folder and its permissions")
        self._lock = threading.Lock()

    def record(self, *, client: str | None, token: str | None, uploads: dict[str, str], like: list[int],
               unlike: list[int], where: str | None, params: dict[str, Any], ids: list[int]) -> None:
        """One search. `uploads` maps each uploaded field ("sketch", "image") to its file's sha256."""
        line = json.dumps({"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "client": client,
                           "token": token_identity(token), "uploads": uploads, "like": like, "unlike": unlike,
                           "where": where, "params": params, "ids": ids})
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()
