"""Two-stage safety training on the Hugging Face Trainer, with a vision-feature cache.

* :class:`TrainConfig` — a YAML recipe (``configs/*.yaml``), validated on load;
* :func:`run_stage` — one stage end to end, returning a :class:`StageResult`;
* :func:`safevlm.train.metrics.head_metrics` — per-head accuracy and macro-F1;
* :mod:`safevlm.train.cache` — the vision-feature cache;
* :mod:`safevlm.train.checkpoint` — sealed checkpoints and resume;
* :mod:`safevlm.train.trainable` — which parameters train, decided in one place;
* :func:`merge_lora` — fold a stage-2 LoRA into a base folder for deployment.

See ``docs/training.md``.
"""

from __future__ import annotations

from safevlm.train.config import ConfigError, TrainConfig
from safevlm.train.metrics import head_metrics


def __getattr__(name: str):
    # run_stage and friends import transformers' Trainer; load them only when asked for.
    if name in ("StageResult", "run_stage"):
        from safevlm.train import stage

        return getattr(stage, name)
    if name == "merge_lora":
        from safevlm.train.merge import merge_lora

        return merge_lora
    raise AttributeError(f"module 'safevlm.train' has no attribute {name!r}")


__all__ = ["ConfigError", "StageResult", "TrainConfig", "head_metrics", "merge_lora", "run_stage"]
