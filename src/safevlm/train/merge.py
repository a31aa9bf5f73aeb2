"""Fold a stage-2 LoRA adapter into its base for deployment.

``merge_lora(base, adapter_dir, out_dir)`` writes a plain Hugging Face model folder (weights
in safetensors, config, processor) whose language model has the LoRA deltas merged in, and
beside it ``safety_adapter/`` with the safety modules only (no ``lora/``)::

    out_dir/config.json, model*.safetensors, processor files, safevlm_merge.json
    out_dir/safety_adapter/safety_config.json, safety_model.safetensors

Load it with ``SafeVLM.from_pretrained(out_dir, out_dir / "safety_adapter")``: no peft at
inference, and the same outputs as base + adapter (up to float rounding of the merge).
The folder is written under a temporary name and renamed when complete.

``export_lora(base, adapter_dir, out_dir)`` (``safevlm merge --lora-only``) writes instead the
stage-2 LoRA alone, for an inference engine that serves LoRA adapters on the unmodified base
(vLLM's ``--lora-modules name=out_dir``; docs/serve.md)::

    out_dir/adapter_config.json, adapter_model.safetensors, safevlm_merge.json

with the module names vLLM uses for the LLaVA HF checkpoint: the language model's layers under
``language_model.model.`` (transformers >= 4.52 names them ``model.language_model.``; vLLM's
``hf_to_vllm_mapper`` maps the one to the other, and names already in vLLM's form load in
versions with and without that mapping), ``target_modules`` as a plain list of layer names.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

SAFETY_ADAPTER_DIR = "safety_adapter"
MERGE_INFO_NAME = "safevlm_merge.json"


def _check_paths(base, adapter_dir, out_dir, overwrite: bool, verb: str) -> tuple[Path, Path, Path]:
    """(adapter_dir, out_dir, the adapter's lora/ folder) once the paths are fit to read and write."""
    from safevlm.model import LORA_DIR
    from safevlm.paths import check_disjoint

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    # replacing out_dir must never delete what is read (--out inside --base, ...)
    check_disjoint(out_dir, {"--base": base if os.path.isdir(str(base)) else None, "--adapter": adapter_dir})
    lora = adapter_dir / LORA_DIR
    if not lora.is_dir():
        raise FileNotFoundError(f"no {LORA_DIR}/ in {adapter_dir}: only stage-2 adapters have a LoRA to {verb}")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; choose another --out or pass --overwrite")
    return adapter_dir, out_dir, lora


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
    from safevlm.model import WEIGHTS_NAME
    from safevlm.train.checkpoint import replace_dir

    adapter_dir, out_dir, lora = _check_paths(base, adapter_dir, out_dir, overwrite, "merge")
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


# vLLM's module-name prefixes of the language model, per base model type: (prefix in the peft
# file after "base_model.model.", prefix vLLM uses). The first matching pair renames a key.
VLLM_LANGUAGE_MODEL_PREFIXES = {
    "llava": (("model.language_model.", "language_model.model."),  # transformers >= 4.52
              ("language_model.model.", "language_model.model.")),  # older checkpoints: already vLLM's
}
PEFT_PREFIX = "base_model.model."


def export_lora(
    base: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    allow_base_mismatch: bool = False,
) -> Path:
    """Write ``adapter_dir/lora`` as a peft LoRA folder an inference engine loads on the
    unmodified base (vLLM: ``--enable-lora --lora-modules NAME=out_dir``); returns ``out_dir``.

    The tensors are copied unchanged (same dtype, rank ``r`` and ``lora_alpha``); only their
    names change, to vLLM's for the base's model type (:data:`VLLM_LANGUAGE_MODEL_PREFIXES`).
    The base is checked against the adapter as in :func:`merge_lora` (its weights are not
    loaded). Refused: a LoRA on anything but the language model, DoRA, per-layer ranks, extra
    trained modules or biases (none of which vLLM serves). An adapter trained with prefix
    safety tokens gets a warning: the engine cannot insert them, so its answers are not the
    in-process ones (train with ``model.safety.num_prefix_tokens=0`` for that).
    """
    import logging

    from safetensors import safe_open
    from safetensors.torch import save_file

    from safevlm.bases import precheck_adapter
    from safevlm.config import SafetyConfig
    from safevlm.train.checkpoint import replace_dir

    adapter_dir, out_dir, lora = _check_paths(base, adapter_dir, out_dir, overwrite, "export")
    safety_config = SafetyConfig.load(adapter_dir)
    prefixes = VLLM_LANGUAGE_MODEL_PREFIXES.get(safety_config.base_model_type)
    if prefixes is None:
        raise ValueError(f"{adapter_dir}: --lora-only knows vLLM's module names for "
                         f"{', '.join(VLLM_LANGUAGE_MODEL_PREFIXES)} bases, not {safety_config.base_model_type!r}; "
                         "use safevlm merge without --lora-only and serve the merged folder")
    config_path = lora / "adapter_config.json"
    config = json.loads(config_path.read_text())
    unsupported = {
        "use_dora": "DoRA", "modules_to_save": "extra trained modules (modules_to_save)",
        "rank_pattern": "per-layer ranks (rank_pattern)", "alpha_pattern": "per-layer alphas (alpha_pattern)",
    }
    for key, what in unsupported.items():
        if config.get(key):
            raise ValueError(f"{config_path}: {key} is set; vLLM does not serve {what}")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{config_path}: bias is {config['bias']!r}; vLLM serves LoRA without biases ('none')")
    precheck_adapter(base, adapter_dir, allow_base_mismatch)  # a wrong base fails here, as in merge_lora

    weights = lora / "adapter_model.safetensors"
    renamed = {}
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            name = key.removeprefix(PEFT_PREFIX)
            for old, new in prefixes:
                if name.startswith(old):
                    renamed[PEFT_PREFIX + new + name[len(old):]] = f.get_tensor(key).contiguous()
                    break
            else:
                raise ValueError(f"{weights}: {key} is not a LoRA weight of the language model; "
                                 "vLLM serves LoRA on the language model only")
    if not renamed:
        raise ValueError(f"{weights} holds no LoRA weights")
    layer_names = sorted({key.split(".lora_")[0].rsplit(".", 1)[-1] for key in renamed})
    out_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "inference_mode": True,
        "base_model_name_or_path": str(base),
        "r": config["r"], "lora_alpha": config["lora_alpha"], "lora_dropout": 0.0,
        "target_modules": layer_names, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": bool(config.get("use_rslora", False)), "use_dora": False, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    if safety_config.num_prefix_tokens:
        logging.getLogger("safevlm.merge").warning(
            "%s was trained with %d prefix safety tokens, which an inference engine cannot insert: served this "
            "way its answers are not the in-process ones (train with model.safety.num_prefix_tokens=0)",
            adapter_dir, safety_config.num_prefix_tokens)

    staging = out_dir.with_name(f".staging-{out_dir.name}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    save_file(renamed, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
    (staging / "adapter_config.json").write_text(json.dumps(out_config, indent=2) + "\n")
    info = {"base": str(base), "adapter": str(adapter_dir), "lora_only": True, "module_names": "vllm",
            "num_prefix_tokens": safety_config.num_prefix_tokens}
    (staging / MERGE_INFO_NAME).write_text(json.dumps(info, indent=2, default=str) + "\n")
    replace_dir(staging, out_dir)
    return out_dir


__all__ = ["MERGE_INFO_NAME", "PEFT_PREFIX", "SAFETY_ADAPTER_DIR", "VLLM_LANGUAGE_MODEL_PREFIXES", "export_lora",
           "merge_lora"]
