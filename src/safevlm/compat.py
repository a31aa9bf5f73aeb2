"""Differences between the supported transformers lines (4.57.x and 5.x), in one place.

Every call whose spelling differs between the two lines goes through a function here, so
the rest of safevlm reads as if there were one transformers. Add a function here rather
than a version check elsewhere; each one names what changed.
"""

from __future__ import annotations

import functools
import inspect

import transformers

TRANSFORMERS_VERSION = transformers.__version__
TRANSFORMERS_MAJOR = int(TRANSFORMERS_VERSION.split(".", 1)[0])


@functools.lru_cache(maxsize=None)
def _init_parameters(cls) -> frozenset[str]:
    return frozenset(inspect.signature(cls.__init__).parameters)


def training_arguments(**kwargs):
    """``transformers.TrainingArguments(**kwargs)``, dropping arguments this line no longer has.

    5.x removed ``save_safetensors`` (safetensors is the only format there); on 4.57 it is
    kept so checkpoints are never pickled.
    """
    from transformers import TrainingArguments

    known = _init_parameters(TrainingArguments)
    dropped = {"save_safetensors"} - known
    return TrainingArguments(**{k: v for k, v in kwargs.items() if k not in dropped})


__all__ = ["TRANSFORMERS_MAJOR", "TRANSFORMERS_VERSION", "training_arguments"]
