"""Helpers shared by the guarded-generation and server tests: a scripted safety head (its
probabilities chosen by a keyword in the prompt) and a forward-call counter."""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import torch


def type_probs(**probs) -> list[float]:
    """Risk-type probabilities in taxonomy order: the given ones, the rest of the mass on ``safe``."""
    from safevlm.taxonomy import DEFAULT_TYPE_NAMES

    out = [probs.get(t, 0.0) for t in DEFAULT_TYPE_NAMES]
    out[-1] += 1.0 - sum(out)
    return out


# Head outputs by keyword: a prompt containing "[hint]" gets a medium illegal risk, and so on.
SCRIPT = {
    "[allow]": ([0.97, 0.01, 0.01, 0.01], type_probs()),
    "[hint]": ([0.05, 0.15, 0.70, 0.10], type_probs(illegal=0.9)),
    "[refuse]": ([0.01, 0.01, 0.03, 0.95], type_probs(illegal=0.97)),
    "[privacy]": ([0.01, 0.01, 0.03, 0.95], type_probs(privacy=0.97)),
    "[nan]": ([math.nan] * 4, type_probs()),
}


@contextlib.contextmanager
def scripted_guard(model, tokenizer):
    """Run the real guard (vision features, projector, head), then replace each row's
    probabilities by the SCRIPT entry whose keyword its prompt contains."""
    real = model.guard

    def guard(input_ids=None, pixel_values=None, attention_mask=None, vision_features=None, prompt_mask=None):
        out = real(input_ids, pixel_values, attention_mask, vision_features, prompt_mask)
        if input_ids is None:
            return out
        level, type_ = out.level_probs.clone(), out.type_probs.clone()
        for row, text in enumerate(tokenizer.batch_decode(input_ids)):
            for key, (lp, tp) in SCRIPT.items():
                if key in text:
                    level[row], type_[row] = torch.tensor(lp), torch.tensor(tp)
        return replace(out, level_probs=level, type_probs=type_, risk_level=level.argmax(-1), risk_type=type_.argmax(-1))

    model.guard = guard
    try:
        yield
    finally:
        del model.guard


@contextlib.contextmanager
def count_calls(module):
    """Yields a list that gets one entry per forward call of ``module``: the shape of its
    ``inputs_embeds`` (language models) or of its first tensor argument (vision towers)."""
    calls = []

    def hook(mod, args, kwargs):
        tensor = kwargs.get("inputs_embeds")
        if tensor is None:
            tensor = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        calls.append(tuple(tensor.shape) if tensor is not None else None)

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


__all__ = ["SCRIPT", "count_calls", "scripted_guard", "type_probs"]
