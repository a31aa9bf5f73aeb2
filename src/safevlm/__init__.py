"""safevlm: safety modules (PSA-VLM) for Hugging Face vision-language models."""

from __future__ import annotations

__version__ = "0.1.0"

from safevlm.config import SafetyConfig
from safevlm.model import GuardOutput, SafeVLM, SafeVLMOutput
from safevlm.taxonomy import DEFAULT_TAXONOMY, Taxonomy

__all__ = ["DEFAULT_TAXONOMY", "GuardOutput", "SafeVLM", "SafeVLMOutput", "SafetyConfig", "Taxonomy", "__version__"]
