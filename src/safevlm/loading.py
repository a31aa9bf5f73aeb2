"""One loader: base model, processor, safety adapter (+ LoRA), device and dtype.

train, merge, classify, chat, serve and the demo all load through here, so a base, an
adapter, ``device`` and ``dtype`` mean the same in each::

    from safevlm.loading import load_model_and_processor
    model, processor = load_model_and_processor("/models/llava-1.5-7b-hf", "runs/stage2/adapter")

* **base**: a Hugging Face LLaVA folder (or a hub id where the environment allows
  downloads), ``tiny:<preset>[@seed]`` for the embedded tiny LLaVA (:mod:`safevlm.tiny`), or,
  in Python, a model already loaded.
* **device**: ``None`` / ``"auto"``: ``cuda`` when a GPU is visible, else ``cpu``
  (:func:`safevlm.devices.resolve_device`). A model passed in stays where it is unless a
  device is given.
* **dtype** (:func:`resolve_dtype`, the only rule): ``"auto"`` (the default everywhere) is
  float32 on CPU, bfloat16 on a CUDA GPU that supports it, float16 on other GPUs and
  accelerators; or ``"float32"`` / ``"bfloat16"`` / ``"float16"`` / a ``torch.dtype``. The
  base is loaded in that dtype (a model passed in is cast in place, as ``nn.Module.to``
  does); at inference the safety modules follow the base's dtype, in training they stay in
  float32 (the optimizer's weights).
* **processor**: the base folder's (the PIL image processor on both transformers lines,
  :func:`load_processor`), the tiny preset's, or the folder / object given.

**An adapter is bound to its exact base.** ``safety_config.json`` records the shape of the
base (checked by :func:`safevlm.bases.check_base_signature`) and a fingerprint of its
weights (:func:`safevlm.bases.base_fingerprint`). Loading an adapter checks, in this order: shapes, then
fingerprint, and only then loads the LoRA adapter and the safety weights, so a wrong base is
refused in one line before peft reads anything. A fingerprint mismatch (same shapes, other
weights, e.g. ``tiny build --seed 1`` against an adapter trained at seed 0) is an error
(:class:`BaseMismatchError`) unless ``allow_base_mismatch`` (``--allow-base-mismatch``,
recipe key ``model.allow_base_mismatch``) turns it into a warning. Adapters saved before the
fingerprint existed load with a warning that they cannot be checked.

**Guard-only** (``guard_only=True``): only what ``SafeVLM.guard`` reads is loaded — the vision
tower, the token embedding table and the safety modules. From a base folder (one
``model.safetensors`` or shards with ``model.safetensors.index.json``) the base is built on the
meta device and only those tensors are read with ``safe_open``: the language model's decoder
layers, final norm, LM head and the base projector are never read nor allocated (for LLaVA-1.5-7B
the guard holds 6.65% of the full model's parameters: ``safevlm params --guard-only``). The
adapter check is unchanged (the fingerprint samples only the embeddings, the patch embedding
and a few rows of the base projector), and the stage-2 LoRA adapter is left out, exactly:
it changes only the language model's linear layers, which guard never runs. ``guard`` then
gives what the full model gives; ``generate`` / ``forward`` raise :class:`GuardOnlyError`.
"""

from __future__ import annotations

import logging
import os

from safevlm.bases import (
    DTYPE_HELP,
    DTYPES,
    BaseMismatchError,
    GuardOnlyError,
    base_fingerprint,
    load_base,
    parse_tiny_spec,
    precheck_adapter,
    resolve_dtype,
)
from safevlm.model import SafeVLM

logger = logging.getLogger("safevlm.loading")


def load_model_and_processor(base, adapter_dir=None, *, device=None, dtype="auto", processor=None,
                             allow_base_mismatch: bool = False, seed: int = 0, trust_remote_code: bool = False,
                             trainable: bool = False, guard_only: bool = False, **safety_overrides):
    """(SafeVLM, processor) from a base (folder, ``tiny:<preset>[@seed]`` or a loaded model)
    and an optional safety adapter folder: what train, merge, classify, chat, serve, eval and
    scan run (in eval mode unless ``trainable``).

    Without an adapter, fresh (untrained) safety modules are built from ``seed`` and, for
    inference, a warning is logged: their decisions carry no meaning. A base folder is
    checked against the adapter (shapes, fingerprint) before its weights are loaded.
    ``processor``: a folder, a processor object, or None for the base's own.
    ``guard_only``: only what guard reads (see the module docstring); ``model.guard_only``
    is then True.
    """
    if isinstance(base, (str, os.PathLike)) and parse_tiny_spec(base) is None and not os.path.isdir(str(base)):
        raise FileNotFoundError(f"model folder not found: {base}")
    if adapter_dir is None and not trainable:
        logger.warning("no safety adapter given: the safety modules are untrained, so their decisions are random")
    if adapter_dir is not None and isinstance(base, (str, os.PathLike)):
        precheck_adapter(base, adapter_dir, allow_base_mismatch, trust_remote_code)  # before any weights load
    if guard_only and trainable:
        raise ValueError("guard_only=True loads no language model and no LoRA adapter, so it cannot be trainable")
    model, processor = load_base(base, dtype=dtype, device=device, processor=processor,
                                 trust_remote_code=trust_remote_code, guard_only=guard_only)
    model = SafeVLM.from_pretrained(model, adapter_dir, dtype=dtype, allow_base_mismatch=allow_base_mismatch,
                                    seed=seed if adapter_dir is None else None, trainable=trainable,
                                    guard_only=guard_only, **safety_overrides)
    return model, processor


__all__ = [
    "DTYPES",
    "DTYPE_HELP",
    "BaseMismatchError",
    "GuardOnlyError",
    "base_fingerprint",
    "load_model_and_processor",
    "resolve_dtype",
]
