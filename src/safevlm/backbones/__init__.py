"""How to reach vision features and token embeddings of each Hugging Face VLM family.

A backbone is a thin view over a loaded base model; it never owns or renames weights.
:mod:`safevlm.backbones.base` states the interface every family implements; one module per
family implements it. ``BACKBONES`` maps ``config.model_type`` to the view, ``FAMILIES`` the
family names users type to the same classes.
"""

from __future__ import annotations

from safevlm.backbones.base import (
    PREFIX_TOKEN_ID,
    Backbone,
    ImageInputs,
    ImagePrompt,
    Positions,
    VisionFeatures,
    causal_lm_loss,
    image_prompt,
    position_ids_from_mask,
    process_images,
    supervised_lm_loss,
)
from safevlm.backbones.gemma3 import Gemma3Backbone
from safevlm.backbones.llava import LlavaBackbone
from safevlm.backbones.llava_next import LlavaNextBackbone, LlavaOnevisionBackbone
from safevlm.backbones.qwen2_vl import Qwen2_5_VLBackbone, Qwen2VLBackbone

FAMILIES: dict[str, type[Backbone]] = {
    cls.family: cls
    for cls in (LlavaBackbone, LlavaNextBackbone, LlavaOnevisionBackbone, Qwen2VLBackbone, Qwen2_5_VLBackbone,
                Gemma3Backbone)
}
BACKBONES: dict[str, type[Backbone]] = {
    model_type: cls for cls in FAMILIES.values() for model_type in cls.model_types
}


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


def family_of(model_type: str) -> str:
    """The family name of a ``config.model_type`` (``ValueError`` when unsupported)."""
    if model_type not in BACKBONES:
        raise ValueError(f"unsupported base model family {model_type!r}; supported: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[model_type].family


__all__ = [
    "BACKBONES",
    "Backbone",
    "FAMILIES",
    "Gemma3Backbone",
    "ImageInputs",
    "ImagePrompt",
    "LlavaBackbone",
    "LlavaNextBackbone",
    "LlavaOnevisionBackbone",
    "PREFIX_TOKEN_ID",
    "Positions",
    "Qwen2VLBackbone",
    "Qwen2_5_VLBackbone",
    "VisionFeatures",
    "causal_lm_loss",
    "supervised_lm_loss",
    "family_of",
    "get_backbone",
    "get_backbone_class",
    "image_prompt",
    "position_ids_from_mask",
    "process_images",
]
