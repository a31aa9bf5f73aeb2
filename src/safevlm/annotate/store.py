"""The ratings store of a rating round: one SQLite file (``--db``), standard library ``sqlite3``.

Tables:

* ``ratings`` — :data:`safevlm.eval.ratings.RATINGS_TABLE_SQL`: one row per (item, rater), what
  ``safevlm eval agreement --ratings FILE.sqlite`` reads;
* ``annotate_meta`` — the secret that signs the raters' session cookies (made once, so a
  restarted server keeps everyone signed in);
* ``annotate_items`` — the ids of the items a round offered, with their kind and source;
* ``annotate_raters`` — who signed in, first and last time.

Every write is one committed transaction in WAL mode with ``synchronous=FULL``: a rating
the server has answered for survives a closed tab, a killed server and a power cut. Each
call opens its own connection, so the app's worker threads never share one; concurrent
writers wait on SQLite's lock (``BEGIN IMMEDIATE``, 60 s), and ``(item, rater)`` is the
primary key, so a rating sent twice is stored once (the second replaces the first).

The order a rater sees the items in is :func:`rater_order`: a random permutation seeded by
the rater's name (sorting by ``sha256(rater, item)``), the same after every restart, and an
item added later lands at a random place without moving the others.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from safevlm.eval.ratings import RATINGS_TABLE_SQL, Rating

_OWN_SCHEMA = """
CREATE TABLE IF NOT EXISTS annotate_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS annotate_items (item TEXT PRIMARY KEY, kind TEXT NOT NULL, source TEXT NOT NULL, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS annotate_raters (rater TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL);
"""


@dataclass(frozen=True)
class StoredRating:
    """A ``ratings`` row: the :class:`~safevlm.eval.ratings.Rating`, the rater's ``comment``, and
    when it was first saved (``created``) and last changed (``updated``), in Unix seconds."""

    rating: Rating
    comment: str | None
    created: float
    updated: float

    def to_dict(self) -> dict:
        return {**self.rating.to_dict(), "comment": self.comment, "created": self.created, "updated": self.updated}


def rater_order(rater: str, item_ids: Iterable[str]) -> list[str]:
    """``item_ids`` in ``rater``'s own random order (see the module docstring)."""
    def key(item_id: str) -> bytes:
        return hashlib.sha256(f"{rater}\x1f{item_id}".encode("utf-8")).digest()

    return sorted(item_ids, key=key)


class RatingStore:
    """Read and write one ratings file (see the module docstring)."""

    def __init__(self, path: "str | os.PathLike"):
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(21, "the ratings store must be a file, not a folder", str(self.path))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(RATINGS_TABLE_SQL)
                db.executescript(_OWN_SCHEMA)
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path}: not a usable SQLite ratings store ({err})") from None

    @contextmanager
    def _connect(self):
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=FULL")
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self):
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ----------------------------------------------------------------- ratings

    def save(self, rating: Rating, comment: str | None = None, when: float | None = None) -> bool:
        """Store (or replace) one rating, committed before returning. True if it is new."""
        return self.save_many([(rating, comment, when, when)]) == 1

    def save_many(self, rows: Sequence[tuple[Rating, "str | None", "float | None", "float | None"]]) -> int:
        """Store ``(rating, comment, created, updated)`` rows in one transaction (``None`` times:
        now; a replaced rating keeps its first ``created``). Returns how many were new."""
        now = time.time()
        new = 0
        with self._transaction() as db:
            for rating, comment, created, updated in rows:
                exists = db.execute("SELECT 1 FROM ratings WHERE item=? AND rater=?", (rating.item, rating.rater)).fetchone()
                new += exists is None
                db.execute(
                    "INSERT INTO ratings (item, rater, label, score, risk_type, risk_level, comment, created, updated)"
                    " VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (item, rater) DO UPDATE SET label=excluded.label,"
                    " score=excluded.score, risk_type=excluded.risk_type, risk_level=excluded.risk_level,"
                    " comment=excluded.comment, updated=excluded.updated",
                    (rating.item, rating.rater, rating.label, rating.score, rating.risk_type, rating.risk_level, comment,
                     now if created is None else created, now if updated is None else updated),
                )
        return new

    def get(self, item: str, rater: str) -> StoredRating | None:
        with self._connect() as db:
            row = db.execute("SELECT item, rater, label, score, risk_type, risk_level, comment, created, updated"
                             " FROM ratings WHERE item=? AND rater=?", (item, rater)).fetchone()
        return None if row is None else _stored(row)

    def rated(self, rater: str) -> set[str]:
        """The ids ``rater`` has rated."""
        with self._connect() as db:
            return {r[0] for r in db.execute("SELECT item FROM ratings WHERE rater=?", (rater,))}

    def all(self) -> list[StoredRating]:
        """Every rating, by item then rater."""
        with self._connect() as db:
            rows = db.execute("SELECT item, rater, label, score, risk_type, risk_level, comment, created, updated"
                              " FROM ratings ORDER BY item, rater").fetchall()
        return [_stored(r) for r in rows]

    # ----------------------------------------------------------------- round bookkeeping

    def secret(self) -> bytes:
        """The cookie-signing secret of this store (made on first use)."""
        with self._transaction() as db:
            row = db.execute("SELECT value FROM annotate_meta WHERE key='cookie_secret'").fetchone()
            if row is None:
                value = secrets.token_hex(32)
                db.execute("INSERT INTO annotate_meta VALUES ('cookie_secret', ?)", (value,))
            else:
                value = row[0]
        return bytes.fromhex(value)

    def register_items(self, items: Iterable, source: str) -> None:
        """Record the ids and kinds of a round's items (kept when they are there already)."""
        now = time.time()
        with self._transaction() as db:
            db.executemany("INSERT OR IGNORE INTO annotate_items VALUES (?,?,?,?)",
                           [(item.id, item.kind, source, now) for item in items])

    def note_rater(self, rater: str) -> None:
        now = time.time()
        with self._transaction() as db:
            db.execute("INSERT INTO annotate_raters VALUES (?,?,?) ON CONFLICT (rater) DO UPDATE SET last_seen=excluded.last_seen",
                       (rater, now, now))


def _stored(row) -> StoredRating:
    item, rater, label, score, risk_type, risk_level, comment, created, updated = row
    return StoredRating(Rating(item, rater, label, score, risk_type, risk_level), comment, created, updated)


__all__ = ["RatingStore", "StoredRating", "rater_order"]
