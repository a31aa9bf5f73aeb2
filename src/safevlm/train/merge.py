"""Fold a stage-2 LoRA adapter into its base for deployment.

``merge_lora(base, adapter_dir, out_dir)`` writes a plain Hugging Face model folder (weights
in safetensors, config, processor) whose language model has the LoRA deltas merged in, and
beside it ``safety_adapter/`` with the safety modules only (no ``lora/``)::

    out_dir/config.json, model*.safetensors, processor files, safevlm_merge.json
    out_dir/safety_adapter/safety_config.json, safety_model.safetensors

Load it with ``SafeVLM.from_pretrained(out_dir, out_dir / "safety_adapter")``: no peft at
inference, and the same outputs as base + adapter (up to float rounding of the merge).
The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

SAFETY_ADAPTER_DIR = "safety_adapter"
MERGE_INFO_NAME = "safevlm_merge.json"


def merge_lora(
    base: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | None = "stored",
    overwrite: bool = False,
    allow_base_mismatch: bool = False,
) -> Path:
    """Merge ``adapter_dir/lora`` into ``base`` and write ``out_dir``; returns ``out_dir``.

    Args:
        base: the base model folder the adapter was trained on (or ``tiny:<preset>[@seed]``).
        adapter_dir: a stage-2 adapter folder (with ``lora/``).
        out_dir: the folder to write (refused if it exists, unless ``overwrite``).
        dtype: dtype to load, merge and save the base in: ``"stored"`` (default: as the base
            folder stores its weights; float32 for ``tiny:``), ``"float32"``, ``"bfloat16"``,
            ``"float16"``. The merge runs on the CPU.
        allow_base_mismatch: merge an adapter trained on a base with other weights (a warning
            instead of :class:`~safevlm.bases.BaseMismatchError`).

    The base is checked against the adapter (shapes, then weights) before the LoRA is loaded,
    and ``safety_adapter/safety_config.json`` records the merged folder's own fingerprint.
    """
    from safevlm.compat import quiet_loading
    from safevlm.config import SafetyConfig
    from safevlm.bases import (
        base_fingerprint,
        check_adapter_base,
        folder_fingerprint,
        load_base,
        load_lora,
        precheck_adapter,
        resolve_dtype,
        stored_dtype,
    )
    from safevlm.model import LORA_DIR, WEIGHTS_NAME
    from safevlm.paths import check_disjoint
    from safevlm.train.checkpoint import replace_dir

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    # replacing out_dir must never delete what is read (--out inside --base, ...)
    check_disjoint(out_dir, {"--base": base if os.path.isdir(str(base)) else None, "--adapter": adapter_dir})
    lora = adapter_dir / LORA_DIR
    if not lora.is_dir():
        raise FileNotFoundError(f"no {LORA_DIR}/ in {adapter_dir}: only stage-2 adapters have a LoRA to merge")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; choose another --out or pass --overwrite")
    safety_config = SafetyConfig.load(adapter_dir)
    target = stored_dtype(base) if dtype in (None, "stored") else resolve_dtype(dtype, "cpu")

    precheck_adapter(base, adapter_dir, allow_base_mismatch)  # a wrong base folder fails before its weights load
    model, processor = load_base(base, dtype=target, device="cpu")
    check_adapter_base(safety_config, model.config, base_fingerprint(model), adapter_dir, allow_base_mismatch)
    with warnings.catch_warnings():
        # peft notes that merged LoRA unties input/output embeddings; LLaVA's are untied already
        warnings.filterwarnings("ignore", message="Input and output embeddings are no longer tied")
        merged = load_lora(model, lora).merge_and_unload()

    staging = out_dir.with_name(f".staging-{out_dir.name}")
    if staging.exists():
        shutil.rmtree(staging)
    with quiet_loading():
        merged.save_pretrained(staging, safe_serialization=True)
    processor.save_pretrained(staging)
    safety = staging / SAFETY_ADAPTER_DIR
    safety.mkdir()
    shutil.copy2(adapter_dir / WEIGHTS_NAME, safety / WEIGHTS_NAME)
    # the safety modules now belong to the merged folder (its own dtype on disk)
    safety_config.base_fingerprint = folder_fingerprint(staging)
    safety_config.save(safety)
    info = {"base": str(base), "adapter": str(adapter_dir), "lora_config": json.loads((lora / "adapter_config.json").read_text())}
    (staging / MERGE_INFO_NAME).write_text(json.dumps(info, indent=2, default=str) + "\n")
    replace_dir(staging, out_dir)
    return out_dir


__all__ = ["MERGE_INFO_NAME", "SAFETY_ADAPTER_DIR", "merge_lora"]
