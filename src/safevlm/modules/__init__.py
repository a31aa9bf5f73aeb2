"""Safety modules, each built from a :class:`~safevlm.config.SafetyConfig`."""

from safevlm.modules.head import SafetyHead, SafetyHeadOutput
from safevlm.modules.projector import CAbstractorProjector, MLPProjector, build_safety_projector
from safevlm.modules.tokens import PrefixSafetyTokens

__all__ = [
    "CAbstractorProjector",
    "MLPProjector",
    "PrefixSafetyTokens",
    "SafetyHead",
    "SafetyHeadOutput",
    "build_safety_projector",
]
