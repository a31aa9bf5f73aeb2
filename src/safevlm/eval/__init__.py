"""Evaluation: refusal rules, head metrics, benchmark runners."""

from safevlm.eval.refusal import RefusalRules, is_refusal

__all__ = ["RefusalRules", "is_refusal"]
