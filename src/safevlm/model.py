"""`SafeVLM`: a Hugging Face VLM plus safety projector, safety head and prefix safety tokens.

The base model is held by composition and never modified: its weights and checkpoint keys
stay as they are, and the adapter saved by :meth:`SafeVLM.save_pretrained` holds only the
safety modules (plus, after stage 2, a LoRA adapter in peft's own format under ``lora/``).

One vision pass per image feeds the base projector, the safety projector and generation::

    V = vision_tower(pixels)                  # (B, N, Dv), once (N per image may vary: tiles, dynamic size)
    image_embeds = base_projector(V)          # (B, N, D)  -> LLM input, laid out as the base does
    S = safety_projector(V)                   # (B, M, Ds) -> safety head (masked where N varies)
    [level, type] = head(queries; [S ; prompt token embeddings])
    LLM([text before image ; P prefix tokens ; image_embeds ; text after])

Everything family-specific goes through the base's backbone view
(:mod:`safevlm.backbones.base` states the hooks): LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision,
Qwen2-VL, Qwen2.5-VL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from safevlm.backbones import PREFIX_TOKEN_ID, VisionFeatures, causal_lm_loss, get_backbone, position_ids_from_mask
from safevlm.bases import GuardOnlyError, check_base_signature, is_guard_only
from safevlm.config import SafetyConfig
from safevlm.modules import PrefixSafetyTokens, SafetyHead, build_safety_projector

WEIGHTS_NAME = "safety_model.safetensors"
LORA_DIR = "lora"


@dataclass
class SafeVLMOutput:
    """Outputs of :meth:`SafeVLM.forward`.

    logits (B, L+P, vocab) or None when the LLM was skipped; level_logits (B, num_levels);
    type_logits (B, num_types). Losses are float32 scalars or None: ``level_loss`` / ``type_loss``
    (cross-entropy of each head), ``lm_loss`` (next-token cross-entropy), and ``loss``, their
    unweighted sum (a trainer weights the components itself, see ``SafetyTrainer``).
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    level_loss: torch.Tensor | None = None
    type_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    level_logits: torch.Tensor | None = None
    type_logits: torch.Tensor | None = None

    def __getitem__(self, key):  # Trainer reads outputs["loss"]
        return getattr(self, key)

    def keys(self):
        return [k for k in self.__dataclass_fields__ if getattr(self, k) is not None]


@dataclass
class LanguageInputs:
    """What the language model reads: inputs_embeds (B, L+P, D), attention_mask (B, L+P), labels
    (B, L+P) or None, input_ids (B, L+P) with ``PREFIX_TOKEN_ID`` at the prefix tokens, and the
    backbone's :class:`~safevlm.backbones.Positions` for them."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    input_ids: torch.Tensor
    positions: object


@dataclass
class GuardOutput:
    """Outputs of :meth:`SafeVLM.guard`: probabilities (B, num_levels) / (B, num_types), the
    argmax ids (B,), and for reuse in generation the vision features (num_images, N, Dv) and
    the head's safety_state (B, W) that conditions the prefix tokens (through
    :meth:`SafeVLM.prefix_state`)."""

    level_logits: torch.Tensor
    type_logits: torch.Tensor
    level_probs: torch.Tensor
    type_probs: torch.Tensor
    risk_level: torch.LongTensor
    risk_type: torch.LongTensor
    vision_features: "torch.Tensor | VisionFeatures | None" = None
    safety_state: torch.Tensor | None = None


class SafeVLM(nn.Module):
    """A base VLM wrapped with safety modules.

    Args:
        base_model: a loaded base of a supported family (``LlavaForConditionalGeneration``,
            ``LlavaNextForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration``,
            ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``; see
            :mod:`safevlm.backbones`), or a peft model around one,
            whole or guard-only (:func:`safevlm.bases.drop_language_model`: then only
            :meth:`guard` runs, and :attr:`guard_only` is True).
        config: a bound :class:`SafetyConfig`; by default built from the base's config.
    """

    def __init__(self, base_model: nn.Module, config: SafetyConfig | None = None, **config_overrides):
        super().__init__()
        self.backbone = get_backbone(base_model)
        if config is None:
            config = SafetyConfig.from_base_config(self.backbone.config, **config_overrides)
        elif config_overrides:
            raise ValueError("pass either a SafetyConfig or field overrides, not both")
        check_base_signature(config, self.backbone.config, source="safety config")
        self.config = config
        self.base_model = base_model
        self.safety_projector = build_safety_projector(config)
        self.safety_head = SafetyHead(config)
        self.prefix_tokens = PrefixSafetyTokens(config)
        ref = self.backbone.model.get_input_embeddings().weight
        self.safety_projector.to(device=ref.device)
        self.safety_head.to(device=ref.device)
        self.prefix_tokens.to(device=ref.device)

    @property
    def guard_only(self) -> bool:
        """True when the base was loaded guard-only: no language model, only :meth:`guard` runs."""
        return is_guard_only(self.base_model)

    @property
    def device(self) -> torch.device:
        """The device of the base's token embeddings (and of the safety modules)."""
        return self.backbone.model.get_input_embeddings().weight.device

    def _require_language_model(self, what: str) -> None:
        if self.guard_only:
            raise GuardOnlyError(
                f"SafeVLM.{what} needs the language model, but this model was loaded guard-only "
                "(guard_only=True: vision tower, token embeddings and safety modules only); only guard() "
                "runs. Load it without guard_only to generate"
            )

    # -- parameters ------------------------------------------------------------------------------
    SAFETY_MODULES = ("safety_projector", "safety_head", "prefix_tokens")

    def safety_named_parameters(self):
        for module_name in self.SAFETY_MODULES:
            for name, param in getattr(self, module_name).named_parameters():
                yield f"{module_name}.{name}", param

    def safety_parameters(self) -> list[nn.Parameter]:
        """All safety-module parameters (projector, head with its queries, prefix tokens)."""
        return [p for _, p in self.safety_named_parameters()]

    def safety_state_dict(self) -> dict[str, torch.Tensor]:
        """Safety weights and buffers only (never base weights)."""
        state = {}
        for module_name in self.SAFETY_MODULES:
            for name, tensor in getattr(self, module_name).state_dict().items():
                state[f"{module_name}.{name}"] = tensor
        return state

    def count_parameters(self) -> dict:
        """Parameter counts: base, safety per module, safety total."""
        modules = {name: sum(p.numel() for p in getattr(self, name).parameters()) for name in self.SAFETY_MODULES}
        safety = sum(modules.values())
        return {"base_params": sum(p.numel() for p in self.base_model.parameters()), "safety_params": safety, "modules": modules}

    # -- inputs -----------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, **image_inputs):
        """Vision features from one pass of the vision tower: (num_images, N, Dv) on fixed-grid
        bases, :class:`~safevlm.backbones.VisionFeatures` where images give variable numbers of
        features. ``image_inputs``: the processor's other image tensors the family needs
        (``image_sizes`` for LLaVA-NeXT / OneVision); other keys are ignored."""
        return self.backbone.vision_features(pixel_values, **self._image_inputs(image_inputs))

    def _image_inputs(self, extra: dict) -> dict:
        """The keys of ``extra`` that the family's vision pass reads (the rest of a batch is not its business)."""
        return {k: extra[k] for k in self.backbone.image_input_keys if extra.get(k) is not None}

    def _vision(self, pixel_values, vision_features, image_inputs=None):
        if vision_features is not None:
            return vision_features
        if pixel_values is None:
            return None
        return self.encode_images(pixel_values, **(image_inputs or {}))

    @staticmethod
    def _check_one_image_per_sample(n_images: int, n_samples: int) -> None:
        if n_images != n_samples:
            raise ValueError(
                f"the safety head needs exactly one image per sample; got {n_images} images for {n_samples} samples"
            )

    def _check_images(self, input_ids, vision_features):
        image_mask = input_ids == self.config.image_token_id
        n_tokens = int(image_mask.sum())
        if vision_features is None:
            if n_tokens:
                raise ValueError(f"input_ids hold {n_tokens} image tokens but no pixel_values were given")
            return image_mask
        n_images, n_per_image = vision_features.shape[:2]
        if not self.config.variable_image_features and n_per_image != self.config.num_image_features:
            raise ValueError(
                f"got {n_per_image} vision features per image but the base gives {self.config.num_image_features}"
            )
        self._check_one_image_per_sample(n_images, input_ids.shape[0])
        per_sample = image_mask.sum(dim=1)
        expected = self.backbone.image_token_counts(vision_features).to(per_sample.device)
        if bool((per_sample != expected).any()):
            if self.config.variable_image_features:
                raise ValueError(
                    f"the images give {expected.tolist()} image features but input_ids hold {per_sample.tolist()} "
                    "image tokens per sample; expand each <image> placeholder as the processor does "
                    "(safevlm.backbones.process_images returns each image's count)"
                )
            raise ValueError(
                f"got {n_images * n_per_image} image features ({n_images} images x {n_per_image}) but "
                f"{n_tokens} image tokens in input_ids (per sample: {per_sample.tolist()}); "
                "expand each <image> placeholder to the number of image features (the processor does this)"
            )
        return image_mask

    def prompt_mask(self, input_ids, attention_mask, labels=None, prompt_mask=None) -> torch.Tensor:
        """Tokens the head reads (B, L): attended, not image placeholders, not supervised answer
        tokens (so an answer never leaks its own label into the head), and within ``prompt_mask``
        (B, L) when given: the collator and guarded generation give it from
        ``safevlm.data.chat.encode_chat``, which leaves every assistant turn out, so the head
        reads the same tokens of a conversation in training and at inference."""
        mask = input_ids != self.config.image_token_id
        if attention_mask is not None:
            mask &= attention_mask.bool()
        if labels is not None:
            mask &= labels == -100
        if prompt_mask is not None:
            mask &= prompt_mask.to(mask.device).bool()
        return mask

    def safety_features(self, vision_features) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The safety projector on vision features -> (S (num_images, M, Ds), mask (num_images, M)
        or None when every row is full). Each image is projected on its own features: the mlp
        keeps its valid ones (the padding is masked), the cabstractor pools its own grid."""
        vision = self.backbone.as_vision_features(vision_features)
        out = self.safety_projector(vision.features.to(self.safety_projector_dtype), vision.lengths, vision.grids)
        if not self.config.variable_image_features or not getattr(self.safety_projector, "keeps_length", False):
            return out, None
        return out, vision.mask

    def _head(self, input_ids, attention_mask, vision_features, labels=None, token_embeds=None, prompt_mask=None):
        if vision_features is not None:  # before the head pairs images with prompts (pan-and-scan crops are more images)
            self._check_one_image_per_sample(vision_features.shape[0], input_ids.shape[0])
        safety_features, safety_mask = (None, None) if vision_features is None else self.safety_features(vision_features)
        if token_embeds is None and self.config.head_use_prompt:
            token_embeds = self.backbone.embed_tokens(input_ids)
        return self.safety_head(
            safety_features, token_embeds, self.prompt_mask(input_ids, attention_mask, labels, prompt_mask),
            safety_mask=safety_mask,
        )

    @property
    def safety_projector_dtype(self):
        return next(self.safety_projector.parameters()).dtype

    def prefix_state(self, safety_state, condition_level=None, condition_type=None):
        """What conditions the prefix tokens, from the head's ``safety_state`` (B, W): the state
        itself (``prefix_conditioning="head"``), or the head's decision (``"decision"``): a risk
        level and a risk type, one-hot side by side (B, num_levels + num_types). Both of the head's
        classifiers say whether the input is safe (level 0, the safe type); the decision is risky
        when the mean of their safe probabilities is below 1/2, and then takes the likeliest
        risky level and risky type (else: level 0, the safe type), so it is never half safe. The
        probabilities are the softmax of the logits, without calibration temperatures (calibrating
        the head does not change what the LLM reads). None for static prefix tokens.

        ``condition_level`` / ``condition_type`` (B,) ("decision" only): rows holding a level and
        a type (not -1) get that decision, one-hot, instead of the head's; the decision swaps of
        stage 2 (``data.decision_swap_ratio``) train the LLM on them.
        """
        mode = self.config.prefix_conditioning
        override = condition_level is not None or condition_type is not None
        if override and (mode != "decision" or not self.prefix_tokens.conditioned):
            raise ValueError(
                "condition_level / condition_type need prefix tokens conditioned on the head's decision "
                f"(prefix_conditioning='decision', num_prefix_tokens > 0); this model has "
                f"prefix_conditioning={mode!r}, num_prefix_tokens={self.config.num_prefix_tokens}"
            )
        if not self.prefix_tokens.conditioned or safety_state is None:
            return None
        if mode == "head":
            return safety_state
        head = self.safety_head
        state = safety_state.to(head.level_classifier.weight.dtype)
        level, kind = self._decide(head.level_classifier(state).float(), head.type_classifier(state).float())
        if override:
            level, kind = self._decision_override(condition_level, condition_type, level, kind)
        return torch.cat([torch.nn.functional.one_hot(level, self.config.num_levels),
                          torch.nn.functional.one_hot(kind, self.config.num_types)], dim=-1).to(state.dtype)

    def _decide(self, level_logits, type_logits):
        """(level, type) (B,) of the decision :meth:`prefix_state` describes."""
        safe_type = self.config.taxonomy.safe_type_id
        level_probs, type_probs = level_logits.softmax(dim=-1), type_logits.softmax(dim=-1)
        risky = (level_probs[:, 0] + type_probs[:, safe_type]) / 2 < 0.5
        risky_level = 1 + level_logits[:, 1:].argmax(dim=-1)
        risky_type = type_logits.masked_fill(
            torch.arange(type_logits.shape[-1], device=type_logits.device) == safe_type, float("-inf")).argmax(dim=-1)
        return (torch.where(risky, risky_level, torch.zeros_like(risky_level)),
                torch.where(risky, risky_type, torch.full_like(risky_type, safe_type)))

    def _decision_override(self, condition_level, condition_type, level, kind):
        """(level, type) (B,) with the rows that ``condition_level`` / ``condition_type`` give
        (not -1) put in place of the head's, after checking the ids (:meth:`prefix_state`)."""
        if condition_level is None or condition_type is None:
            raise ValueError("condition_level and condition_type go together: got only one of them")
        want_level = condition_level.to(level.device).long()
        want_type = condition_type.to(level.device).long()
        if want_level.shape != level.shape or want_type.shape != level.shape:
            raise ValueError(f"condition_level / condition_type must be ({level.shape[0]},), got "
                             f"{tuple(want_level.shape)} / {tuple(want_type.shape)}")
        rows = want_level >= 0
        n_levels, n_types = self.config.num_levels, self.config.num_types
        bad = ((rows != (want_type >= 0)) | (want_level < -1) | (want_level >= n_levels) | (want_type < -1)
               | (want_type >= n_types))
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"row {i}: condition level {int(want_level[i])} / type {int(want_type[i])} is not a "
                             f"decision (levels 0..{n_levels - 1}, types 0..{n_types - 1}, or -1 for both: the head's own)")
        return torch.where(rows, want_level, level), torch.where(rows, want_type, kind)

    def build_inputs_embeds(
        self, input_ids, attention_mask, vision_features, labels=None, token_embeds=None, safety_state=None
    ):
        """LLM inputs with image embeds scattered in and prefix tokens inserted before the first
        image token (or the first attended token when there is no image; the backbone's
        ``prefix_anchor`` says where).

        ``safety_state`` (B, W) is the head's safety_state for conditioned prefix tokens (what
        conditions them is :meth:`prefix_state` of it); when it is needed and not given, the head
        is run here (no second vision pass).

        Returns (inputs_embeds (B, L+P, D), attention_mask (B, L+P), labels (B, L+P) or None).
        """
        llm = self.language_inputs(input_ids, attention_mask, vision_features, labels, token_embeds, safety_state)
        return llm.inputs_embeds, llm.attention_mask, llm.labels

    def language_inputs(
        self, input_ids, attention_mask, vision_features, labels=None, token_embeds=None, safety_state=None,
        prefix_state=None,
    ) -> LanguageInputs:
        """:meth:`build_inputs_embeds` plus the LLM-side input ids (``PREFIX_TOKEN_ID`` at the
        prefix tokens) and the positions the backbone derives from them (M-RoPE families read
        where the image tokens sit). ``prefix_state``: what conditions the prefix tokens, already
        made (:meth:`prefix_state`); it takes the place of ``safety_state``."""
        self._require_language_model("build_inputs_embeds")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_mask = self._check_images(input_ids, vision_features)
        embeds = self.backbone.embed_tokens(input_ids) if token_embeds is None else token_embeds
        if vision_features is not None:
            embeds = self.backbone.scatter_image_embeds(embeds, image_mask, vision_features)
        anchor = self.backbone.prefix_anchor(input_ids, image_mask, attention_mask)
        if self.prefix_tokens.conditioned and prefix_state is None:
            if safety_state is None:
                safety_state = self._head(input_ids, attention_mask, vision_features, labels).safety_state
            prefix_state = self.prefix_state(safety_state)
        embeds, mask, labels = self.prefix_tokens.insert(embeds, attention_mask, anchor, labels, prefix_state)
        llm_ids = self.prefix_tokens.insert_ids(input_ids, anchor, PREFIX_TOKEN_ID)
        positions = self.backbone.positions(llm_ids, mask, vision_features)
        return LanguageInputs(embeds, mask, labels, llm_ids, positions)

    @staticmethod
    def position_ids(attention_mask: torch.Tensor) -> torch.LongTensor:
        """Positions counted over attended tokens, as Hugging Face generation does."""
        return position_ids_from_mask(attention_mask)

    # -- forward ------------------------------------------------------------------------------------
    # forward takes **unused (extra batch keys) but no loss kwargs such as num_items_in_batch:
    # this tells the Trainer to scale the loss for gradient accumulation itself.
    accepts_loss_kwargs = False

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        risk_level: torch.LongTensor | None = None,
        risk_type: torch.LongTensor | None = None,
        vision_features: torch.Tensor | None = None,
        compute_lm: bool = True,
        prompt_mask: torch.Tensor | None = None,
        return_logits: bool = True,
        condition_level: torch.LongTensor | None = None,
        condition_type: torch.LongTensor | None = None,
        **unused,
    ) -> SafeVLMOutput:
        """LM logits, risk logits and the loss components.

        input_ids (B, L), pixel_values (B, C, H, W) (anyres families: (B, tiles, C, H, W), with
        ``image_sizes`` (B, 2) among the keyword arguments, where the processor's other image
        tensors go; Qwen2-VL: (patches, C*T*P*P) with ``image_grid_thw`` (B, 3)) or precomputed
        vision_features from :meth:`encode_images`,
        attention_mask (B, L), labels (B, L) with -100 for unsupervised tokens, risk_level (B,),
        risk_type (B,), prompt_mask (B, L) from the collator (the tokens the head reads; see
        :meth:`prompt_mask`), condition_level / condition_type (B,) decisions that condition the
        prefix tokens in place of the head's (-1: the head's own; see :meth:`prefix_state`).
        ``compute_lm=False`` skips the language model (no logits, no lm_loss):
        the head alone, as stage-1 training without an LM loss needs. ``return_logits=False``
        (what training passes) returns no LM logits: ``lm_loss`` is then computed with the LM
        head at the supervised tokens only (the same value, less compute).

        Returns a :class:`SafeVLMOutput` with ``level_loss`` / ``type_loss`` when risk labels are
        given, ``lm_loss`` when ``labels`` are given and the LLM runs, and ``loss`` = their
        unweighted sum. How much each counts is a training setting: ``SafetyTrainer`` weights
        them with the recipe's ``loss.cls_weight`` / ``loss.lm_weight``.

        A guard-only model (:attr:`guard_only`) raises :class:`~safevlm.bases.GuardOnlyError`
        unless ``compute_lm=False``.
        """
        if compute_lm:
            self._require_language_model("forward")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        vision_features = self._vision(pixel_values, vision_features, unused)
        token_embeds = self.backbone.embed_tokens(input_ids)

        head = self._head(input_ids, attention_mask, vision_features, labels, token_embeds, prompt_mask)
        out = SafeVLMOutput(level_logits=head.level_logits, type_logits=head.type_logits)
        if risk_level is not None:
            out.level_loss = F.cross_entropy(head.level_logits.float(), risk_level.to(head.level_logits.device))
        if risk_type is not None:
            out.type_loss = F.cross_entropy(head.type_logits.float(), risk_type.to(head.type_logits.device))

        if compute_lm:
            # The LM loss trains the prefix tokens but never moves the head: detached, the head
            # stays a classifier trained by the classification loss alone.
            with torch.no_grad():
                state = self.prefix_state(head.safety_state, condition_level, condition_type)
            state = state.detach() if state is not None else None
            llm = self.language_inputs(
                input_ids, attention_mask, vision_features, labels, token_embeds, prefix_state=state
            )
            if return_logits:
                out.logits = self.backbone.language_forward(llm.inputs_embeds, llm.attention_mask, llm.positions)
                if llm.labels is not None:
                    out.lm_loss = causal_lm_loss(out.logits, llm.labels)
            elif llm.labels is not None:
                out.lm_loss = self.backbone.language_loss(llm.inputs_embeds, llm.attention_mask, llm.positions, llm.labels)
        elif condition_level is not None or condition_type is not None:
            self.prefix_state(None, condition_level, condition_type)  # the same checks with or without the LM
        parts = [x for x in (out.level_loss, out.type_loss, out.lm_loss) if x is not None]
        if parts:
            out.loss = sum(parts)
        return out

    # -- guard mode -----------------------------------------------------------------------------------
    @torch.no_grad()
    def guard(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        **image_inputs,
    ) -> GuardOutput:
        """Risk probabilities from the vision tower, safety projector and head only.

        The language model is never called. ``input_ids`` may be None (image-only guard).
        ``prompt_mask`` (B, L) limits the tokens the head reads (see :meth:`prompt_mask`).
        ``image_inputs``: the processor's other image tensors (``image_sizes``...), as in :meth:`forward`.
        """
        vision_features = self._vision(pixel_values, vision_features, image_inputs)
        if input_ids is None or not self.config.head_use_prompt:
            if vision_features is None:
                raise ValueError("guard needs pixel_values/vision_features or input_ids")
            safety_features, safety_mask = self.safety_features(vision_features)
            head = self.safety_head(safety_features, safety_mask=safety_mask)
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            head = self._head(input_ids, attention_mask, vision_features, prompt_mask=prompt_mask)
        return GuardOutput(
            level_logits=head.level_logits,
            type_logits=head.type_logits,
            level_probs=head.level_probs,
            type_probs=head.type_probs,
            risk_level=head.level_probs.argmax(dim=-1),
            risk_type=head.type_probs.argmax(dim=-1),
            vision_features=vision_features,
            safety_state=head.safety_state,
        )

    # -- generation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        safety_state: torch.Tensor | None = None,
        **generation_kwargs,
    ) -> torch.LongTensor:
        """Generate with prefix tokens, one vision pass and the KV cache.

        Returns only the new tokens (B, T_new), as ``generate`` does from ``inputs_embeds``.
        Pass ``vision_features`` (and ``safety_state``) from :meth:`guard` to reuse that vision
        pass (and that head pass); without ``safety_state`` the head runs here when the prefix
        tokens are conditioned. A guard-only model raises :class:`~safevlm.bases.GuardOnlyError`.
        """
        self._require_language_model("generate")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_inputs = {k: generation_kwargs.pop(k) for k in self.backbone.image_input_keys if k in generation_kwargs}
        vision_features = self._vision(pixel_values, vision_features, image_inputs)
        llm = self.language_inputs(input_ids, attention_mask, vision_features, safety_state=safety_state)
        generation_kwargs.setdefault("use_cache", True)
        return self.backbone.generate(self.base_model, llm.inputs_embeds, llm.attention_mask, llm.positions,
                                      **generation_kwargs)

    # -- save / load ---------------------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike, save_lora: bool = True, state_dict: dict | None = None
    ) -> Path:
        """Write ``safety_config.json`` + ``safety_model.safetensors`` (safety weights only), and the
        LoRA adapter under ``lora/`` when the base is a peft model. Files are written to a temp
        name and renamed, so a kill never leaves a half-written file under the final name.

        ``state_dict``: full tensors keyed as in ``self.state_dict()`` (e.g. gathered with
        ``accelerator.get_state_dict`` under FSDP / ZeRO-3, where this module's own parameters
        are shards); by default the module's own tensors are written. A guard-only model
        raises :class:`~safevlm.bases.GuardOnlyError` (it holds no LoRA adapter to save).
        """
        from safetensors.torch import save_file

        self._require_language_model("save_pretrained")

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        expected = self.safety_state_dict()
        base_state = None
        if state_dict is None:
            state = expected
        else:
            state = {k: v for k, v in state_dict.items() if k.split(".", 1)[0] in self.SAFETY_MODULES}
            if set(state) != set(expected):
                missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
                raise ValueError(f"the given state dict lacks safety keys {missing[:5]} / has unknown ones {extra[:5]}")
            prefix = "base_model."
            base_state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt", "safevlm": "safety_adapter"})
        os.replace(tmp, directory / WEIGHTS_NAME)
        from safevlm.bases import base_fingerprint

        self.config.base_fingerprint = base_fingerprint(self.base_model)  # binds the adapter to this base
        self.config.save(directory)
        if save_lora and hasattr(self.base_model, "peft_config"):
            self.base_model.save_pretrained(str(directory / LORA_DIR), state_dict=base_state)
        return directory

    def load_safety_weights(self, adapter_dir: str | os.PathLike) -> None:
        from safetensors.torch import load_file

        path = Path(adapter_dir) / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {adapter_dir}")
        state = load_file(str(path))
        own = self.safety_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"{path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        for key, tensor in state.items():
            if tensor.shape != own[key].shape:
                raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, the model has {tuple(own[key].shape)}")
        for module_name in self.SAFETY_MODULES:
            prefix = module_name + "."
            getattr(self, module_name).load_state_dict(
                {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            )

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike | nn.Module,
        adapter_dir: str | os.PathLike | None = None,
        dtype: torch.dtype | str | None = "auto",
        device: str | torch.device | None = None,
        allow_base_mismatch: bool = False,
        trust_remote_code: bool = False,
        torch_dtype: torch.dtype | str | None = None,
        trainable: bool = False,
        seed: int | None = None,
        guard_only: bool = False,
        **config_overrides,
    ) -> "SafeVLM":
        """Load a base (folder, ``tiny:<preset>[@seed]`` or a loaded model) and, if given, a
        safety adapter folder onto it. :mod:`safevlm.loading` states the rules.

        Without an adapter, fresh safety modules are built (``config_overrides`` set their
        fields; ``seed`` seeds their initialisation). With one, the base is checked first
        (shapes, then weights fingerprint: :func:`safevlm.bases.check_adapter_base`; a base
        folder before its weights are read), then the LoRA adapter (``lora/``) and the safety
        weights are loaded. An adapter trained on a base with other weights is refused unless
        ``allow_base_mismatch``.

        ``dtype``: ``"auto"`` (float32 on CPU, bfloat16 on GPUs that support it, else
        float16), a name like ``"bfloat16"`` or a ``torch.dtype`` (``torch_dtype`` is accepted
        as an alias). ``device``: default ``cuda`` if available, else ``cpu``; a model passed
        in stays where it is. ``trainable``: for training, the LoRA adapter is trainable and
        the safety modules stay in float32; otherwise they take the base's dtype and the model
        is returned in eval mode.

        ``guard_only``: load only what :meth:`guard` reads — vision tower, token embeddings and
        the safety modules — and leave the language model out (decoder layers, final norm, LM
        head and base projector are never read from a folder nor allocated; a ``tiny:`` base
        is built whole, then they are dropped; a model passed in loses them in place). The
        LoRA adapter is left out too, which is exact because it lies in the language model
        only (:func:`safevlm.bases.check_guard_lora` refuses one that does not). The base
        check (shapes, fingerprint) is the same. ``generate``, ``forward`` and
        ``save_pretrained`` then raise :class:`~safevlm.bases.GuardOnlyError`.
        """
        from safevlm.bases import (
            base_fingerprint,
            check_adapter_base,
            check_guard_lora,
            load_base_model,
            load_lora,
            precheck_adapter,
        )

        if torch_dtype is not None:
            if dtype not in (None, "auto") and dtype != torch_dtype:
                raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass dtype only")
            dtype = torch_dtype
        if guard_only and trainable:
            raise ValueError("guard_only=True loads no language model and no LoRA adapter, so it cannot be trainable")
        if adapter_dir is not None:
            adapter_dir = Path(adapter_dir)
            if not adapter_dir.is_dir():
                raise FileNotFoundError(f"adapter folder not found: {adapter_dir}")
            if config_overrides:
                raise ValueError(f"config overrides {sorted(config_overrides)} cannot change a saved adapter's config")
            if not isinstance(base, nn.Module):
                precheck_adapter(base, adapter_dir, allow_base_mismatch, trust_remote_code)
        base = load_base_model(base, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                               guard_only=guard_only)
        if adapter_dir is None:
            if seed is not None:
                torch.manual_seed(seed)
            model = cls(base, **config_overrides)
        else:
            config = SafetyConfig.load(adapter_dir)
            check_adapter_base(config, get_backbone(base).config, base_fingerprint(base), adapter_dir,
                               allow_base_mismatch)
            if (adapter_dir / LORA_DIR).is_dir():
                if is_guard_only(base):
                    check_guard_lora(base, adapter_dir / LORA_DIR)  # exact without it: guard never runs it
                else:
                    base = load_lora(base, adapter_dir / LORA_DIR, trainable=trainable)
            model = cls(base, config)
            model.load_safety_weights(adapter_dir)
        if not trainable:
            dtype = model.backbone.model.get_input_embeddings().weight.dtype
            for name in cls.SAFETY_MODULES:
                getattr(model, name).to(dtype)
            model.eval()
        return model


__all__ = ["GuardOutput", "LanguageInputs", "SafeVLM", "SafeVLMOutput"]
