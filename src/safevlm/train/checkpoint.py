"""Kill-safe checkpoints: staged, fsynced, renamed into place; state in safetensors + JSON.

A checkpoint is written into ``<output_dir>/.staging-checkpoint-<step>``; when every file is
there (and every rank has written its own), a ``checkpoint.json`` manifest listing each file
and its size is written last, everything is fsynced, and the folder is renamed to
``checkpoint-<step>`` in one atomic step. A kill at any moment therefore leaves either no
``checkpoint-<step>`` or a complete one; :func:`find_resume_checkpoint` also re-checks the
manifest (a folder whose files are missing or have another size, e.g. half deleted by hand,
is skipped) and picks the newest complete checkpoint.

Optimizer, scheduler, scaler and RNG states are stored without pickle: tensors in
safetensors, everything else in JSON (DeepSpeed and FSDP keep their own formats).
"""

from __future__ import annotations

import json
import logging
import os
import random
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
OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.json"
SCALER_FILE = "scaler.json"
RNG_FILE = "rng_state.safetensors"
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


def commit_checkpoint(staging: str | os.PathLike, final: str | os.PathLike, step: int) -> Path:
    """Write the manifest, fsync, and rename ``staging`` to ``final``."""
    write_manifest(staging, step)
    replace_dir(staging, final)
    return Path(final)


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


# ------------------------------------------------------------------------------ JSON helpers
def write_json(path: str | os.PathLike, data) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def _jsonable(value, what: str):
    if torch.is_tensor(value):
        return {"__tensor__": value.tolist(), "dtype": str(value.dtype).replace("torch.", "")}
    if isinstance(value, dict):
        return {str(k): _jsonable(v, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, what) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in the {what} state as JSON")


def _from_jsonable(value):
    if isinstance(value, dict):
        if "__tensor__" in value:
            return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
        return {k: _from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_jsonable(v) for v in value]
    return value


# ------------------------------------------------------------------------------ optimizer
def save_optimizer_state(optimizer, path: str | os.PathLike) -> None:
    """``optimizer.state_dict()`` as safetensors: per-parameter tensors + JSON param groups."""
    from safetensors.torch import save_file

    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"state.{param_id}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{param_id}.{key}"] = _jsonable(value, "optimizer")
    metadata = {
        "format": "safevlm-optimizer/1",
        "param_groups": json.dumps(_jsonable(state_dict["param_groups"], "optimizer")),
        "scalars": json.dumps(scalars),
    }
    save_file(tensors, str(path), metadata=metadata)


def load_optimizer_state(optimizer, path: str | os.PathLike, device=None) -> None:
    from safetensors import safe_open

    state: dict[int, dict] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != "safevlm-optimizer/1":
            raise ValueError(f"{path} is not a safevlm optimizer state")
        for key in f.keys():
            _, param_id, name = key.split(".", 2)
            tensor = f.get_tensor(key)
            state.setdefault(int(param_id), {})[name] = tensor.to(device) if device is not None else tensor
    for key, value in json.loads(metadata["scalars"]).items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = _from_jsonable(value)
    groups = _from_jsonable(json.loads(metadata["param_groups"]))
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ------------------------------------------------------------------------------ RNG
def rng_file_name(process_index: int, world_size: int) -> str:
    return RNG_FILE if world_size <= 1 else f"rng_state_{process_index}.safetensors"


def save_rng_state(path: str | os.PathLike) -> None:
    """Python, NumPy, torch CPU (and CUDA) generator states: tensors in safetensors, the rest JSON."""
    from safetensors.torch import save_file

    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    tensors = {"cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    metadata = {
        "format": "safevlm-rng/1",
        "python": json.dumps([version, list(internal), gauss]),
        "numpy": json.dumps([np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_cached)]),
    }
    save_file(tensors, str(path), metadata=metadata)


def load_rng_state(path: str | os.PathLike) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if metadata.get("format") != "safevlm-rng/1":
        raise ValueError(f"{path} is not a safevlm RNG state")
    version, internal, gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json.loads(metadata["numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.set_rng_state(cuda[min(torch.cuda.current_device(), len(cuda) - 1)])


# ------------------------------------------------------------------------------ scheduler / scaler
def save_state_json(obj, path: str | os.PathLike, what: str) -> None:
    write_json(path, _jsonable(obj.state_dict(), what))


def load_state_json(obj, path: str | os.PathLike) -> None:
    obj.load_state_dict(_from_jsonable(read_json(path)))


__all__ = [
    "CHECKPOINT_PREFIX",
    "MANIFEST_NAME",
    "STAGING_PREFIX",
    "checkpoint_problem",
    "commit_checkpoint",
    "delete_dir",
    "find_resume_checkpoint",
    "fsync_tree",
    "list_checkpoints",
    "load_optimizer_state",
    "load_rng_state",
    "load_state_json",
    "remove_stale_staging",
    "replace_dir",
    "save_optimizer_state",
    "save_rng_state",
    "save_state_json",
    "write_manifest",
]
