"""safevlm: safety modules (PSA-VLM) for Hugging Face vision-language models."""

from __future__ import annotations

__version__ = "0.1.0"

from safevlm.taxonomy import DEFAULT_TAXONOMY, Taxonomy

__all__ = ["DEFAULT_TAXONOMY", "Taxonomy", "__version__"]
