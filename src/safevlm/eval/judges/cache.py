"""On-disk cache of LLM-judge verdicts (SQLite, standard library), so re-runs cost nothing.

The key is a hash of (judge model, rubric version hash, the rendered judge messages — which
hold the prompt, the answer, the category's criteria and the reference —, prompt, answer).
Only ``ok`` verdicts are stored: a failed or unparseable reply is asked again next time.
Safe to share between threads and processes (SQLite locking, WAL journal).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

from safevlm.eval.judges.base import Judgement, stable_hash

CACHE_ENV = "SAFEVLM_JUDGE_CACHE"


def default_cache_path() -> Path:
    """``$SAFEVLM_JUDGE_CACHE``, else ``~/.cache/safevlm/judge_cache.sqlite``."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "safevlm" / "judge_cache.sqlite"


def cache_key(judge_model: str, rubric_hash: str, messages, prompt: str, answer: str) -> str:
    return stable_hash({"model": judge_model, "rubric": rubric_hash, "messages": messages, "prompt": prompt, "answer": answer})


class JudgeCache:
    """``get(key) -> Judgement | None`` / ``put(key, judgement, ...)`` over one SQLite file."""

    def __init__(self, path: "str | os.PathLike"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, judge_model TEXT, rubric_hash TEXT,"
            " judgement TEXT NOT NULL, created REAL)"
        )

    def get(self, key: str) -> Judgement | None:
        with self._lock:
            row = self._db.execute("SELECT judgement FROM verdicts WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        data = json.loads(row[0])
        data["cached"] = True
        return Judgement.from_dict(data)

    def put(self, key: str, judgement: Judgement, judge_model: str, rubric_hash: str) -> None:
        if judgement.status != "ok":
            return
        data = judgement.to_dict()
        data.pop("cached", None)
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?)",
                (key, judge_model, rubric_hash, json.dumps(data), time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


__all__ = ["CACHE_ENV", "JudgeCache", "cache_key", "default_cache_path"]
