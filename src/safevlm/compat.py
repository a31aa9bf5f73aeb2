"""Differences between the supported transformers lines (4.57.x and 5.x), in one place.

Every call whose spelling differs between the two lines goes through a function here, so
the rest of safevlm reads as if there were one transformers. Add a function here rather
than a version check elsewhere; each one names what changed.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings

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


def is_checkpointing(model) -> bool:
    """Whether a Hugging Face model trains with activation (gradient) checkpointing.

    5.x renamed ``is_gradient_checkpointing`` to ``is_activation_checkpointing`` and warns on
    the old name; 4.57 has only the old one. Modules that are not Hugging Face models: False.
    """
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


# -- loading --------------------------------------------------------------------------------------
def processor_load_kwargs() -> dict:
    """Keyword arguments for ``AutoProcessor.from_pretrained`` that pick the PIL ("slow") image
    processor on purpose, so that training and serving preprocess images identically on both
    lines, with or without torchvision, and without a notice on stderr.

    4.57: ``use_fast=False`` (left unset it prints "Using a slow image processor as `use_fast`
    is unset"); 5.x: ``backend="pil"`` (``use_fast`` is deprecated there, and the default
    backend needs torchvision and prints a fallback notice without it).
    """
    return {"backend": "pil"} if TRANSFORMERS_MAJOR >= 5 else {"use_fast": False}


def clip_image_processor_class():
    """The PIL CLIP image processor class: ``CLIPImageProcessorPil`` on 5.x (where
    ``CLIPImageProcessor`` is the torchvision one and, without torchvision, prints a fallback
    notice), ``CLIPImageProcessor`` on 4.57. Both save as ``CLIPImageProcessor``."""
    import transformers as tf

    return tf.CLIPImageProcessorPil if TRANSFORMERS_MAJOR >= 5 else tf.CLIPImageProcessor


def pil_image_processor_class(name: str):
    """The PIL image processor class named ``name`` (e.g. ``"LlavaNextImageProcessor"``):
    ``{name}Pil`` on 5.x (where ``{name}`` is the torchvision one), ``{name}`` on 4.57 (the PIL
    one there). Both save under the base name, so ``AutoProcessor`` with
    :func:`processor_load_kwargs` loads the PIL one back on either line."""
    import transformers as tf

    return getattr(tf, f"{name}Pil") if TRANSFORMERS_MAJOR >= 5 else getattr(tf, name)


def mm_token_type_inputs(input_ids, image_token_id: int) -> dict:
    """The token-type input a Qwen2-VL / Qwen2.5-VL base reads beside ``input_ids`` on this line,
    as its processor gives it: 5.x ``{"mm_token_type_ids": (B, L) int, 1 at image tokens}`` (its
    M-RoPE finds the images there; without it the base falls back to text positions), 4.57 none
    (it finds each image by its ``<|vision_start|>`` token)."""
    if TRANSFORMERS_MAJOR >= 5:
        return {"mm_token_type_ids": (input_ids == image_token_id).int()}
    return {}


def mrope_position_ids(model, input_ids, image_grid_thw, attention_mask, image_token_id: int):
    """M-RoPE position ids (3, B, L) of a Qwen2-VL / Qwen2.5-VL prompt by the base's own
    ``get_rope_index`` (``model``: the inner ``Qwen2VLModel``), padding included as the base sets
    it; its arguments differ by line (:func:`mm_token_type_inputs`). Ids that are no image token
    (the prefix tokens' -1 included) count as text on both lines."""
    return model.get_rope_index(input_ids=input_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask,
                                **mm_token_type_inputs(input_ids, image_token_id))[0]


@contextlib.contextmanager
def embeds_generation(model):
    """For the ``with`` block, let ``model.generate(inputs_embeds=...)`` run where the model's
    ``prepare_inputs_for_generation`` forwards ``inputs_embeds`` only through ``**kwargs``.

    ``generate`` decides whether a model can start from embeddings by looking for a parameter
    named ``inputs_embeds`` in that method's signature. 5.x's ``Gemma3ForConditionalGeneration``
    takes ``(input_ids, use_cache, is_first_iteration, **kwargs)`` and passes the embeddings on to
    the generic method, which uses them, yet ``generate`` refuses them ("doesn't have its
    forwarding implemented"); 4.57's names the parameter. The model (the base inside a peft model)
    gets, for the block only, a wrapper of its own method that names it; nothing changes where
    the signature already does."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    prepare = inner.prepare_inputs_for_generation
    if "inputs_embeds" in inspect.signature(prepare).parameters:
        yield
        return

    def prepare_inputs_for_generation(input_ids, inputs_embeds=None, **kwargs):
        return prepare(input_ids, inputs_embeds=inputs_embeds, **kwargs)

    inner.prepare_inputs_for_generation = prepare_inputs_for_generation
    try:
        yield
    finally:
        del inner.prepare_inputs_for_generation


# Warnings that transformers or peft raise from inside their own calls while we load a model;
# nothing on our side can avoid them. 5.x: peft reads the deprecated `is_gradient_checkpointing`
# whenever it wraps a model (PeftModel.from_pretrained, get_peft_model).
THIRD_PARTY_LOADING_WARNINGS = (r"`is_gradient_checkpointing` is deprecated",)


@contextlib.contextmanager
def quiet_loading():
    """For the ``with`` block only: no weight loading / writing progress bars (5.x draws
    "Loading weights" and "Writing model shards" bars on every load and save, 4.57 one for
    sharded checkpoints) and none of :data:`THIRD_PARTY_LOADING_WARNINGS`."""
    from transformers.utils import logging as hf_logging

    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            for pattern in THIRD_PARTY_LOADING_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()


__all__ = [
    "THIRD_PARTY_LOADING_WARNINGS",
    "TRANSFORMERS_MAJOR",
    "TRANSFORMERS_VERSION",
    "clip_image_processor_class",
    "embeds_generation",
    "mm_token_type_inputs",
    "mrope_position_ids",
    "pil_image_processor_class",
    "processor_load_kwargs",
    "quiet_loading",
    "training_arguments",
]
