"""The local server's voice store: cloned voices in SQLite, scoped by API key.

Role: persistence and the rules that need it (protocol.md §4.6, §4.8): voice names in the
documented pattern, the per-key quota (enforced atomically: the count and the insert run in
one synchronous call, so concurrent creates on the event loop cannot overshoot), tenant
isolation (every query filters on a SHA-256 of the API key; the key itself is never
stored), the retention purge of voices unused for ``retention_s``, and ``last_used``
bookkeeping for synthesis.

Boundary: synchronous sqlite3 calls on the event-loop thread. Each is a primary-key or
indexed lookup of microseconds, which is cheaper than hopping to a thread. Time is an
argument (``now``: wall-clock epoch seconds), so the purge is testable.

List order: creation order (oldest first, ties broken by insertion order). Chosen because
it keeps pages stable while new voices are added (they only ever append to the end).
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from ..messages import PREFERRED_NAME_RE

__all__ = [
    "PREFERRED_NAME_RE",
    "VOICE_NAME_RE",
    "QuotaFull",
    "StoredVoice",
    "VoiceStore",
    "format_gmt",
    "key_hash",
]

log = logging.getLogger(__name__)

VOICE_NAME_RE = re.compile(
    rf"^qwen-tts-vc-{PREFERRED_NAME_RE.pattern}-voice-\d{{17}}-[0-9a-f]{{4}}$"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS voices (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    key_hash TEXT NOT NULL,
    target_model TEXT NOT NULL,
    preferred_name TEXT NOT NULL,
    language TEXT,
    pitch_hz REAL,
    created_ms INTEGER NOT NULL,
    modified_ms INTEGER NOT NULL,
    last_used_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS voices_by_key ON voices (key_hash, seq);
"""


def key_hash(api_key: str) -> str:
    """The stored identity of an API key (hex SHA-256; the key itself is never stored)."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def format_gmt(epoch_ms: int) -> str:
    """``YYYY-MM-DD HH:MM:SS`` in UTC, the list timestamp format (§4.3; zone chosen: UTC)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch_ms / 1000))


def _name_stamp(epoch_ms: int) -> str:
    """17-digit ``yyyyMMddHHmmssSSS`` (UTC) of the voice name pattern (§4.6)."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(epoch_ms // 1000)) + f"{epoch_ms % 1000:03d}"


class QuotaFull(Exception):
    """The key already holds ``quota`` voices."""


@dataclass(frozen=True)
class StoredVoice:
    """One row of the store."""

    name: str
    target_model: str
    preferred_name: str
    language: str | None
    pitch_hz: float | None
    created_ms: int
    modified_ms: int
    last_used_ms: int
    features: str | None = None  # speaker features (JSON, server/likeness.py), if measured


_COLUMNS = (
    "name, target_model, preferred_name, language, pitch_hz, created_ms, modified_ms, last_used_ms"
    ", features"
)


class VoiceStore:
    """SQLite-backed voices; one instance per server, used from the event-loop thread."""

    def __init__(self, path: str | Path, *, quota: int = 1000, retention_s: float) -> None:
        self.path = Path(path)
        self.quota = quota
        self.retention_s = retention_s
        self._db = sqlite3.connect(self.path, isolation_level=None)
        # WAL + NORMAL: a commit costs no fsync, and a crash loses at most the last writes.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(voices)")}
        if "features" not in columns:  # databases made before speaker features existed
            self._db.execute("ALTER TABLE voices ADD COLUMN features TEXT")
        self._closed = False

    def close(self) -> None:
        """Close the database (idempotent)."""
        if not self._closed:
            self._closed = True
            self._db.close()

    # --- queries ----------------------------------------------------------------------------

    def count(self, owner: str) -> int:
        sql = "SELECT COUNT(*) FROM voices WHERE key_hash = ?"
        row = self._db.execute(sql, (owner,)).fetchone()
        return int(row[0])

    def get(self, owner: str, name: str, *, now: float) -> StoredVoice | None:
        """The voice ``name`` of ``owner``, or None (absent, another key's, or expired)."""
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM voices WHERE name = ? AND key_hash = ?", (name, owner)
        ).fetchone()
        if row is None:
            return None
        voice = StoredVoice(*row)
        if voice.last_used_ms < self._cutoff_ms(now):
            return None
        return voice

    def page(self, owner: str, *, page_index: int, page_size: int) -> tuple[list[StoredVoice], int]:
        """One page in creation order, and the total count."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM voices WHERE key_hash = ? ORDER BY seq LIMIT ? OFFSET ?",
            (owner, page_size, page_index * page_size),
        ).fetchall()
        return [StoredVoice(*r) for r in rows], self.count(owner)

    # --- changes ----------------------------------------------------------------------------

    def create(
        self,
        owner: str,
        *,
        preferred_name: str,
        target_model: str,
        language: str | None,
        pitch_hz: float | None,
        now: float,
        features: str | None = None,
    ) -> StoredVoice:
        """Mint a name and insert the voice, or raise :class:`QuotaFull`.

        Synchronous on purpose: no other coroutine runs between the count and the insert.
        """
        if self.count(owner) >= self.quota:
            raise QuotaFull
        now_ms = int(now * 1000)
        for _ in range(16):
            stamp = _name_stamp(now_ms)
            name = f"qwen-tts-vc-{preferred_name}-voice-{stamp}-{secrets.token_hex(2)}"
            try:
                self._db.execute(
                    "INSERT INTO voices (name, key_hash, target_model, preferred_name, language,"
                    " pitch_hz, created_ms, modified_ms, last_used_ms, features)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, owner, target_model, preferred_name, language, pitch_hz,
                     now_ms, now_ms, now_ms, features),
                )  # fmt: skip
            except sqlite3.IntegrityError:
                continue  # the 4 hex digits collided within the same millisecond
            return StoredVoice(
                name, target_model, preferred_name, language, pitch_hz, now_ms, now_ms, now_ms,
                features,
            )
        raise RuntimeError("could not mint a unique voice name")

    def delete(self, owner: str, name: str) -> bool:
        """Delete ``owner``'s voice; False when it is not there (or not theirs)."""
        cur = self._db.execute("DELETE FROM voices WHERE name = ? AND key_hash = ?", (name, owner))
        return cur.rowcount > 0

    def touch(self, owner: str, name: str, *, now: float) -> None:
        """Record that a synthesis used the voice now (resets its retention clock)."""
        self._db.execute(
            "UPDATE voices SET last_used_ms = ? WHERE name = ? AND key_hash = ?",
            (int(now * 1000), name, owner),
        )

    def purge(self, *, now: float) -> int:
        """Delete voices unused for longer than the retention period; returns how many."""
        cur = self._db.execute("DELETE FROM voices WHERE last_used_ms < ?", (self._cutoff_ms(now),))
        if cur.rowcount:
            log.info("purged %d voice(s) unused for %.0f s", cur.rowcount, self.retention_s)
        return cur.rowcount

    def _cutoff_ms(self, now: float) -> int:
        return int((now - self.retention_s) * 1000)
