"""How to reach vision features and token embeddings of each Hugging Face VLM family.

A backbone is a thin view over a loaded base model; it never owns or renames weights.
"""

from __future__ import annotations

from safevlm.backbones.llava import LlavaBackbone, causal_lm_loss, position_ids_from_mask

BACKBONES = {"llava": LlavaBackbone}


def _model_type(config) -> str:
    return getattr(config, "model_type", type(config).__name__)


def get_backbone_class(config):
    """The backbone class for a base config; ``ValueError`` for unsupported families."""
    model_type = _model_type(config)
    if model_type not in BACKBONES:
        raise ValueError(
            f"unsupported base model family {model_type!r}; supported: {', '.join(sorted(BACKBONES))}"
        )
    return BACKBONES[model_type]


def get_backbone(model):
    """Wrap a loaded base model (or a peft model around it) in its backbone view."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config; expected a Hugging Face VLM")
    return get_backbone_class(config)(inner)


__all__ = [
    "BACKBONES",
    "LlavaBackbone",
    "causal_lm_loss",
    "get_backbone",
    "get_backbone_class",
    "position_ids_from_mask",
]
