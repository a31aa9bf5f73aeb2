"""Which parameters train: decided here and nowhere else.

Every parameter of a :class:`~safevlm.model.SafeVLM` (or of a bare base VLM) belongs to one
*part*, found by :func:`parameter_parts`:

* ``vision_tower``, ``base_projector``: the base's vision encoder and multimodal projector;
* ``language_model``: the LLM (token embeddings, decoder layers, LM head);
* ``lora``: peft LoRA weights added to the LLM (stage 2);
* ``safety_projector``, ``safety_head``, ``prefix_tokens``: the safety modules.

:func:`set_trainable` makes exactly the named parts trainable and freezes the rest;
:func:`stage_parts` names the parts of each training stage. The training stages, the demo's
base pre-training and the parameter counts in the logs all go through these functions::

    set_trainable(model, stage_parts(1, train_prefix=False))   # stage 1 with w_lm = 0
    set_trainable(base, {"base_projector", "language_model"})  # the demo's LLaVA-style pre-training
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import nn

BASE_PARTS = ("vision_tower", "base_projector", "language_model", "lora")
SAFETY_PARTS = ("safety_projector", "safety_head", "prefix_tokens")
PARTS = BASE_PARTS + SAFETY_PARTS
LORA_MARKER = "lora_"  # peft names every LoRA parameter lora_A / lora_B / lora_embedding_*


def stage_parts(stage: int, safety_modules: str = "train", train_prefix: bool = True) -> frozenset[str]:
    """The parts a training stage trains.

    stage 1: the safety modules on a frozen base; stage 2: LoRA, plus the safety modules when
    ``safety_modules == "train"`` or the prefix tokens alone when ``"prefix"`` (the stage-1
    projector and head are kept as they are). ``train_prefix=False`` leaves the prefix tokens
    frozen (they are read only by the LLM, so without an LM loss they get no gradient).
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    if safety_modules not in ("train", "prefix", "frozen"):
        raise ValueError(f"safety_modules must be 'train', 'prefix' or 'frozen', got {safety_modules!r}")
    if stage == 1 or safety_modules == "train":
        parts = set(SAFETY_PARTS)
    else:
        parts = {"prefix_tokens"} if safety_modules == "prefix" else set()
    if stage == 2:
        parts.add("lora")
    if not train_prefix:
        parts.discard("prefix_tokens")
    return frozenset(parts)


def parameter_parts(model: nn.Module) -> Iterator[tuple[str, str, nn.Parameter]]:
    """``(part, name, parameter)`` for every parameter of ``model`` (a SafeVLM or a base VLM)."""
    from safevlm.backbones import get_backbone

    safety_modules = getattr(model, "SAFETY_MODULES", ())
    owner: dict[int, str] = {}
    for module_name in safety_modules:
        for param in getattr(model, module_name).parameters():
            owner[id(param)] = module_name
    backbone = model.backbone if safety_modules else get_backbone(model)
    for part, module in (("vision_tower", backbone.vision_tower), ("base_projector", backbone.projector)):
        for param in module.parameters():
            owner.setdefault(id(param), part)
    for name, param in model.named_parameters():
        part = owner.get(id(param))
        if part not in SAFETY_PARTS and LORA_MARKER in name:
            part = "lora"
        yield part or "language_model", name, param


def set_trainable(model: nn.Module, parts: Iterable[str]) -> dict[str, int]:
    """Make the parameters of ``parts`` trainable and freeze every other one.

    Empty parameters (e.g. zero prefix tokens) stay frozen: DDP would otherwise wait for their
    gradients. Returns the trainable element counts per part (as :func:`trainable_counts`).
    """
    parts = set(parts)
    unknown = sorted(parts - set(PARTS))
    if unknown:
        raise ValueError(f"unknown parameter part(s) {unknown}; allowed: {', '.join(PARTS)}")
    for part, _, param in parameter_parts(model):
        param.requires_grad_(part in parts and param.numel() > 0)
    return trainable_counts(model)


def trainable_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameter elements per part (parts with none are left out)."""
    counts: dict[str, int] = {}
    for part, _, param in parameter_parts(model):
        if param.requires_grad:
            counts[part] = counts.get(part, 0) + param.numel()
    return counts


__all__ = ["BASE_PARTS", "PARTS", "SAFETY_PARTS", "parameter_parts", "set_trainable", "stage_parts", "trainable_counts"]
