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
    torch_dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Merge ``adapter_dir/lora`` into ``base`` and write ``out_dir``; returns ``out_dir``.

    Args:
        base: the base model folder the adapter was trained on (or ``tiny:<preset>[@seed]``).
        adapter_dir: a stage-2 adapter folder (with ``lora/``).
        out_dir: the folder to write (refused if it exists, unless ``overwrite``).
        torch_dtype: dtype to load and save the base in (``float16``, ``bfloat16``, ``float32``;
            default: as stored).
    """
    import torch
    from peft import PeftModel

    from safevlm.config import CONFIG_NAME, SafetyConfig
    from safevlm.model import LORA_DIR, WEIGHTS_NAME, check_base_signature, load_base_model
    from safevlm.train.checkpoint import replace_dir
    from safevlm.train.stage import parse_tiny_spec

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    lora = adapter_dir / LORA_DIR
    if not lora.is_dir():
        raise FileNotFoundError(f"no {LORA_DIR}/ in {adapter_dir}: only stage-2 adapters have a LoRA to merge")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; choose another --out or pass --overwrite")
    safety_config = SafetyConfig.load(adapter_dir)
    dtype = None if torch_dtype in (None, "auto") else getattr(torch, torch_dtype)

    tiny = parse_tiny_spec(str(base))
    if tiny is not None:
        from safevlm.tiny import build_tiny

        model, processor = build_tiny(*tiny)
        if dtype is not None:
            model = model.to(dtype)
    else:
        from transformers import AutoProcessor

        model = load_base_model(base, torch_dtype=dtype)
        processor = AutoProcessor.from_pretrained(str(base))
    check_base_signature(safety_config, model.config, source=f"adapter {adapter_dir}")
    with warnings.catch_warnings():
        # peft notes that merged LoRA unties input/output embeddings; LLaVA's are untied already
        warnings.filterwarnings("ignore", message="Input and output embeddings are no longer tied")
        merged = PeftModel.from_pretrained(model, str(lora)).merge_and_unload()

    staging = out_dir.with_name(f".staging-{out_dir.name}")
    if staging.exists():
        shutil.rmtree(staging)
    merged.save_pretrained(staging, safe_serialization=True)
    processor.save_pretrained(staging)
    safety = staging / SAFETY_ADAPTER_DIR
    safety.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        shutil.copy2(adapter_dir / name, safety / name)
    info = {"base": str(base), "adapter": str(adapter_dir), "lora_config": json.loads((lora / "adapter_config.json").read_text())}
    (staging / MERGE_INFO_NAME).write_text(json.dumps(info, indent=2, default=str) + "\n")
    replace_dir(staging, out_dir)
    return out_dir


__all__ = ["MERGE_INFO_NAME", "SAFETY_ADAPTER_DIR", "merge_lora"]
