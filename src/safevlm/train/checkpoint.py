"""Kill-safe checkpoints: a size manifest written last, checked before a resume.

The Trainer writes ``checkpoint-<step>/`` with its standard files: the adapter (our
``save_model``: ``safety_config.json``, ``safety_model.safetensors``, ``lora/``), the optimizer,
scheduler and RNG states (``optimizer.pt``, ``scheduler.pt``, ``rng_state*.pth``) and
``trainer_state.json``. When every rank has written its files, :func:`seal_checkpoint` fsyncs
them and writes ``checkpoint.json`` listing each file and its size, last and atomically
(temp file + rename). A folder without that manifest, or whose files are missing or have
another size, is not a checkpoint: a kill at any moment leaves either a sealed checkpoint or
one that :func:`find_resume_checkpoint` skips (naming why).

The state files are torch pickles. Before a resume, :func:`check_weights_only` unpickles each
with ``torch.load(weights_only=True)`` (tensors, numbers, strings and containers, plus the NumPy
arrays of the RNG state): a file holding any other object is refused, so resuming never runs
code from a checkpoint. The adapter itself stays safetensors + JSON.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint"
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
MANIFEST_NAME = "checkpoint.json"
TORCH_STATE_SUFFIXES = (".pt", ".pth", ".bin")  # the Trainer's optimizer / scheduler / scaler / RNG files
LEGACY_STATE_FILES = ("optimizer.safetensors", "rng_state.safetensors")  # safevlm < this layout
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")


# ------------------------------------------------------------------------------ file system
def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (so a rename inside it is durable)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    root = Path(root)
    for path in sorted(root.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(root)


def replace_dir(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a fully written ``staging`` folder to ``final`` atomically (an old ``final`` is
    renamed away first and deleted after)."""
    staging, final = Path(staging), Path(final)
    fsync_tree(staging)
    trash = None
    if final.exists():
        trash = final.with_name(f"{TRASH_PREFIX}{final.name}-{os.getpid()}")
        if trash.exists():
            shutil.rmtree(trash)
        os.rename(final, trash)
    os.rename(staging, final)
    fsync_path(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def delete_dir(path: str | os.PathLike) -> None:
    """Delete a checkpoint folder: renamed to a hidden name first, so a kill half-way never
    leaves a half-deleted folder under a checkpoint name."""
    path = Path(path)
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def write_manifest(directory: str | os.PathLike, step: int) -> dict:
    """List every file under ``directory`` with its size in ``checkpoint.json`` (written last)."""
    directory = Path(directory)
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = {"format": 1, "step": step, "files": files}
    tmp = directory / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, directory / MANIFEST_NAME)
    return manifest


def seal_checkpoint(directory: str | os.PathLike, step: int) -> dict:
    """Make a fully written checkpoint folder durable and complete: fsync every file, then write
    the manifest (the commit point) and fsync it and the folder."""
    directory = Path(directory)
    fsync_tree(directory)
    manifest = write_manifest(directory, step)
    fsync_path(directory / MANIFEST_NAME)
    fsync_path(directory)
    fsync_path(directory.parent)
    return manifest


def checkpoint_problem(directory: str | os.PathLike) -> str | None:
    """Why ``directory`` is not a complete checkpoint, or None when it is."""
    directory = Path(directory)
    manifest_file = directory / MANIFEST_NAME
    if not manifest_file.is_file():
        return f"no {MANIFEST_NAME} (not written by safevlm, or interrupted)"
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return f"unreadable {MANIFEST_NAME} ({err})"
    match = _CHECKPOINT_RE.match(directory.name)
    if match and int(match.group(1)) != manifest.get("step"):
        return f"{MANIFEST_NAME} says step {manifest.get('step')} but the folder is {directory.name}"
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, folder)]`` of ``checkpoint-<step>`` folders, newest first (complete or not)."""
    out = []
    root = Path(output_dir)
    if root.is_dir():
        for path in root.iterdir():
            match = _CHECKPOINT_RE.match(path.name)
            if match and path.is_dir():
                out.append((int(match.group(1)), path))
    return sorted(out, reverse=True)


def find_resume_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``output_dir`` (incomplete ones are skipped with a warning)."""
    for _, path in list_checkpoints(output_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("skipping incomplete checkpoint %s: %s", path, problem)
    return None


def rotate_checkpoints(output_dir: str | os.PathLike, keep: int | None) -> list[Path]:
    """Keep the newest ``keep`` complete checkpoints; delete every checkpoint folder older than
    the oldest one kept (complete or not). Returns what was deleted."""
    if keep is None:
        return []
    deleted, kept = [], 0
    for _, path in list_checkpoints(output_dir):
        if kept >= keep:
            delete_dir(path)
            deleted.append(path)
        elif checkpoint_problem(path) is None:
            kept += 1
    return deleted


def legacy_state_problem(directory: str | os.PathLike) -> str | None:
    """Why ``directory``'s optimizer / RNG state cannot be restored, when it was written by an
    earlier safevlm (safetensors state files that the Trainer does not read); None otherwise."""
    directory = Path(directory)
    legacy = [n for n in LEGACY_STATE_FILES if (directory / n).is_file()]
    if legacy and not (directory / "optimizer.pt").is_file():
        return (
            f"its training state ({', '.join(legacy)}) was written by an earlier safevlm and is no longer "
            "read; start a new run from its adapter instead (model.adapter: <this folder>)"
        )
    return None


def _numpy_state_globals() -> list:
    """What a NumPy RNG state needs beyond torch's weights-only allowlist (the Trainer's own list)."""
    core = np._core if hasattr(np, "_core") else np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def check_weights_only(directory: str | os.PathLike) -> None:
    """Refuse a checkpoint whose torch state files hold anything but plain data.

    Every ``*.pt`` / ``*.pth`` / ``*.bin`` file directly in ``directory`` is unpickled with
    ``torch.load(weights_only=True)`` (memory-mapped: tensors are not read). ``ValueError``
    names the first file that holds another object or cannot be read.
    """
    directory = Path(directory)
    for path in sorted(directory.iterdir()):
        if not (path.is_file() and path.suffix in TORCH_STATE_SUFFIXES):
            continue
        try:
            with torch.serialization.safe_globals(_numpy_state_globals()):
                torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"{path}: holds a pickled object that is not plain tensors or containers ({reason}); "
                "refusing to resume from it (a checkpoint never needs one)"
            ) from err
        except (RuntimeError, OSError, EOFError) as err:
            raise ValueError(f"{path}: not a readable torch state file ({err})") from err


def remove_stale_staging(output_dir: str | os.PathLike) -> list[Path]:
    """Delete staging / trash folders that a killed run left behind; returns what was removed."""
    removed = []
    root = Path(output_dir)
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and (path.name.startswith(STAGING_PREFIX) or path.name.startswith(TRASH_PREFIX)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


__all__ = [
    "CHECKPOINT_PREFIX",
    "MANIFEST_NAME",
    "STAGING_PREFIX",
    "check_weights_only",
    "checkpoint_problem",
    "delete_dir",
    "find_resume_checkpoint",
    "fsync_tree",
    "legacy_state_problem",
    "list_checkpoints",
    "remove_stale_staging",
    "replace_dir",
    "rotate_checkpoints",
    "seal_checkpoint",
    "write_manifest",
]
