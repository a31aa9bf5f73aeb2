"""Judges behind one interface: ``rules`` (phrase rules), ``semantic`` (packaged sentence
encoder, optional extra) and ``openai`` (any OpenAI-compatible endpoint). Backends are
imported only when :func:`make_judge` builds them."""

from safevlm.eval.judges.base import JUDGES, RUBRICS, Judge, Judgement, JudgeRequest, make_judge, stable_hash

__all__ = ["JUDGES", "RUBRICS", "Judge", "JudgeRequest", "Judgement", "make_judge", "stable_hash"]
