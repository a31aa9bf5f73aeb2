"""safevlm: safety modules (PSA-VLM) for Hugging Face vision-language models.

``SafeVLM``, ``SafetyConfig`` and the output types are imported lazily, so that light users
(``safevlm.data``, ``safevlm --help``) do not pay for importing torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

from safevlm.taxonomy import DEFAULT_TAXONOMY, Taxonomy

_LAZY = {
    "GuardOutput": "safevlm.model",
    "SafeVLM": "safevlm.model",
    "SafeVLMOutput": "safevlm.model",
    "SafetyConfig": "safevlm.config",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'safevlm' has no attribute {name!r}")


__all__ = ["DEFAULT_TAXONOMY", "GuardOutput", "SafeVLM", "SafeVLMOutput", "SafetyConfig", "Taxonomy", "__version__"]
