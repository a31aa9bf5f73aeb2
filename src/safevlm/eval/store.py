"""The results store: one SQLite file per run folder (standard library ``sqlite3``).

Tables (keyed by the run key ``model``, ``adapter``, ``policy`` — labels the runner gives,
``""`` for none — and ``task``, ``item_id``):

* ``answers``    — one row per item: the item (JSON), the prompt given to the model, the
  answer (``NULL`` when generation failed: ``error``), the safety head's output (JSON);
* ``judgements`` — one row per (item, judge, rubric): status ``ok`` / ``unjudged``, the
  verdict fields, the reason and the judge's raw reply;
* ``skipped``    — the items each task's reader skipped, with location and reason;
* view ``results`` — answers joined with their judgements: one row per
  (model, adapter, policy, task, item, judge, rubric).

Every write is its own committed transaction (a batch of answers, one verdict), in WAL
mode: a run killed at any point (even ``kill -9``) loses at most the batch in flight, and a
re-run skips what is stored, so nothing is generated or judged twice.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from safevlm.data import Skipped
from safevlm.eval.items import EvalItem
from safevlm.eval.judges.base import Judgement

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS answers (
    model TEXT NOT NULL, adapter TEXT NOT NULL, policy TEXT NOT NULL, task TEXT NOT NULL, item_id TEXT NOT NULL,
    item TEXT NOT NULL, prompt TEXT NOT NULL, answer TEXT, head TEXT, error TEXT, created REAL NOT NULL,
    PRIMARY KEY (model, adapter, policy, task, item_id)
);
CREATE TABLE IF NOT EXISTS judgements (
    model TEXT NOT NULL, adapter TEXT NOT NULL, policy TEXT NOT NULL, task TEXT NOT NULL, item_id TEXT NOT NULL,
    judge TEXT NOT NULL, rubric TEXT NOT NULL, status TEXT NOT NULL, refused INTEGER, harmful INTEGER, score REAL,
    label TEXT, reason TEXT, raw TEXT, cached INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL,
    PRIMARY KEY (model, adapter, policy, task, item_id, judge, rubric)
);
CREATE TABLE IF NOT EXISTS skipped (
    model TEXT NOT NULL, adapter TEXT NOT NULL, policy TEXT NOT NULL, task TEXT NOT NULL,
    location TEXT NOT NULL, reason TEXT NOT NULL
);
CREATE VIEW IF NOT EXISTS results AS
    SELECT a.model, a.adapter, a.policy, a.task, a.item_id, a.prompt, a.answer, a.head, a.error,
           j.judge, j.rubric, j.status, j.refused, j.harmful, j.score, j.label, j.reason
    FROM answers a LEFT JOIN judgements j
    ON a.model = j.model AND a.adapter = j.adapter AND a.policy = j.policy AND a.task = j.task AND a.item_id = j.item_id;
"""


@dataclass(frozen=True)
class RunKey:
    """Which system produced the answers: ``model``, ``adapter`` and ``policy`` labels
    (paths or names as the user gave them; ``""`` for none)."""

    model: str
    adapter: str = ""
    policy: str = ""

    def __post_init__(self):
        if not self.model:
            raise ValueError("a run key needs the model label")
        object.__setattr__(self, "adapter", self.adapter or "")
        object.__setattr__(self, "policy", self.policy or "")

    def as_tuple(self) -> tuple[str, str, str]:
        return (self.model, self.adapter, self.policy)


@dataclass(frozen=True)
class StoredAnswer:
    """An ``answers`` row: the item, the prompt the model saw, its answer / head output / error."""

    item: EvalItem
    prompt: str
    answer: str | None
    head: dict | None
    error: str | None


def _bool(value) -> bool | None:
    return None if value is None else bool(value)


class ResultsStore:
    """Read and write one run's ``results.sqlite`` (see the module docstring)."""

    def __init__(self, path: "str | os.PathLike"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise ValueError(f"{self.path}: results store schema {row[0]}, this safevlm reads {SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----------------------------------------------------------------- answers

    def answered_ids(self, key: RunKey, task: str, include_failed: bool = False) -> set[str]:
        """Ids of items with a stored answer (and, with ``include_failed``, a failed generation)."""
        sql = "SELECT item_id FROM answers WHERE model=? AND adapter=? AND policy=? AND task=?"
        if not include_failed:
            sql += " AND answer IS NOT NULL"
        return {r[0] for r in self._db.execute(sql, (*key.as_tuple(), task))}

    def put_answers(self, key: RunKey, task: str, rows: Iterable[tuple[EvalItem, str, "str | None", "dict | None", "str | None"]]) -> int:
        """Store ``(item, prompt, answer, head, error)`` rows in one transaction; a failed
        generation stored earlier is replaced. Returns the number written."""
        now = time.time()
        values = [
            (*key.as_tuple(), task, item.id, json.dumps(item.to_dict(), ensure_ascii=False), prompt, answer,
             None if head is None else json.dumps(head, ensure_ascii=False), error, now)
            for item, prompt, answer, head, error in rows
        ]
        with self._transaction():
            self._db.executemany(
                "INSERT INTO answers VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (model, adapter, policy, task, item_id)"
                " DO UPDATE SET item=excluded.item, prompt=excluded.prompt, answer=excluded.answer, head=excluded.head,"
                " error=excluded.error, created=excluded.created WHERE answers.answer IS NULL",
                values,
            )
        return len(values)

    def answers(self, key: RunKey, task: str) -> dict[str, StoredAnswer]:
        """Every stored answer row of ``task``, by item id."""
        out = {}
        for item_id, item, prompt, answer, head, error in self._db.execute(
            "SELECT item_id, item, prompt, answer, head, error FROM answers WHERE model=? AND adapter=? AND policy=? AND task=?",
            (*key.as_tuple(), task),
        ):
            out[item_id] = StoredAnswer(EvalItem.from_dict(json.loads(item)), prompt, answer,
                                        None if head is None else json.loads(head), error)
        return out

    # ----------------------------------------------------------------- judgements

    def judged_ids(self, key: RunKey, task: str, judge: str, rubric: str, include_unjudged: bool = True) -> set[str]:
        """Ids with a stored verdict of ``judge`` for ``rubric`` (``ok`` only unless ``include_unjudged``)."""
        sql = "SELECT item_id FROM judgements WHERE model=? AND adapter=? AND policy=? AND task=? AND judge=? AND rubric=?"
        if not include_unjudged:
            sql += " AND status = 'ok'"
        return {r[0] for r in self._db.execute(sql, (*key.as_tuple(), task, judge, rubric))}

    def put_judgement(self, key: RunKey, task: str, item_id: str, judge: str, rubric: str, verdict: Judgement) -> None:
        """Store (or replace) one verdict, committed at once."""
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO judgements VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (*key.as_tuple(), task, item_id, judge, rubric, verdict.status,
                 None if verdict.refused is None else int(verdict.refused),
                 None if verdict.harmful is None else int(verdict.harmful),
                 verdict.score, verdict.label, verdict.reason, verdict.raw, int(verdict.cached), time.time()),
            )

    def judgements(self, key: RunKey, task: str, judge: str) -> dict[tuple[str, str], Judgement]:
        """``{(item_id, rubric): verdict}`` of one judge on ``task``."""
        out = {}
        for item_id, rubric, status, refused, harmful, score, label, reason, raw, cached in self._db.execute(
            "SELECT item_id, rubric, status, refused, harmful, score, label, reason, raw, cached FROM judgements"
            " WHERE model=? AND adapter=? AND policy=? AND task=? AND judge=?",
            (*key.as_tuple(), task, judge),
        ):
            out[(item_id, rubric)] = Judgement(status, _bool(refused), _bool(harmful), score, label, reason, raw, bool(cached))
        return out

    def judges(self, key: RunKey, task: str) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT DISTINCT judge FROM judgements WHERE model=? AND adapter=? AND policy=? AND task=? ORDER BY judge",
            (*key.as_tuple(), task))]

    # ----------------------------------------------------------------- skipped

    def replace_skipped(self, key: RunKey, task: str, skipped: Sequence[Skipped]) -> None:
        """The reader's skipped list for ``task`` (replaces the previous read's)."""
        with self._transaction():
            self._db.execute("DELETE FROM skipped WHERE model=? AND adapter=? AND policy=? AND task=?", (*key.as_tuple(), task))
            self._db.executemany("INSERT INTO skipped VALUES (?,?,?,?,?,?)",
                                 [(*key.as_tuple(), task, s.location, s.reason) for s in skipped])

    def skipped(self, key: RunKey, task: str) -> list[Skipped]:
        return [Skipped(loc, reason) for loc, reason in self._db.execute(
            "SELECT location, reason FROM skipped WHERE model=? AND adapter=? AND policy=? AND task=? ORDER BY rowid",
            (*key.as_tuple(), task))]

    # ----------------------------------------------------------------- misc

    def keys(self) -> list[RunKey]:
        return [RunKey(*r) for r in self._db.execute("SELECT DISTINCT model, adapter, policy FROM answers ORDER BY 1, 2, 3")]

    def tasks(self, key: RunKey) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT DISTINCT task FROM answers WHERE model=? AND adapter=? AND policy=? ORDER BY task", key.as_tuple())]

    def _transaction(self):
        db = self._db

        class _Tx:
            def __enter__(self_inner):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self_inner, exc_type, exc, tb):
                db.execute("ROLLBACK" if exc_type else "COMMIT")
                return False

        return _Tx()


__all__ = ["RunKey", "ResultsStore", "SCHEMA_VERSION", "StoredAnswer"]
