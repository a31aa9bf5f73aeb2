"""Backbone view of ``Gemma3ForConditionalGeneration`` (Gemma 3, transformers 4.57 and 5.x).

How this base sees an image (the processor and the model agree on it):

* the image processor resizes every image to one square size (896 px on the releases; no
  tiles: pan-and-scan, which would add crops as further images, is off by default and refused
  here, since the safety head reads one image per sample);
* the SigLIP vision tower gives a fixed square grid of patch features (64 x 64 of width 1152 on
  the releases; no CLS feature), and the base projector (``Gemma3MultiModalProjector``)
  average-pools that grid to ``mm_tokens_per_image`` tokens (16 x 16 = 256), normalises and
  projects them to the LLM width;
* the chat template writes ``<start_of_image>`` for an image and the processor expands it to
  ``\\n\\n<start_of_image>`` + 256 x ``<image_soft_token>`` + ``<end_of_image>\\n\\n``
  (:func:`~safevlm.backbones.image_prompt` reads that rule off the processor);
* the language model scales token embeddings by sqrt(hidden) inside its embedding module
  (``Gemma3TextScaledWordEmbedding``): ``get_input_embeddings()(ids)`` is exactly what the
  decoder reads, and ``inputs_embeds`` are read as given;
* the image tokens of one image attend to each other in both directions (the processor's
  ``token_type_ids``, 1 at image tokens, tell the base's mask builder where the block is;
  4.57 and 5.x build that mask with different code, and compose it differently with the
  sliding window of the local layers), every other token causally; positions are plain 1-D
  RoPE positions (local and global layers with their own frequencies).

The safety side reads the SigLIP patch features *before* the base projector's pooling, like
LLaVA-1.5's: every image the same N = (image_size / patch_size)^2 features on its square grid
(:meth:`Gemma3Backbone.vision_features` returns a plain tensor (num_images, N, Dv)), while it
takes ``mm_tokens_per_image`` image tokens in the prompt (:attr:`fixed_image_tokens`).

Prefix safety tokens go before ``<start_of_image>`` (the block stays whole) and are text:
``positions`` gives ``token_type_ids`` over the LLM input with the prefix included, so the
base's bidirectional image mask covers exactly the image tokens, in the forward pass and in
the prompt pass of KV-cache generation (the decoding steps are text, as in the base's own
``generate``). They are inserted after the embedding scale, in the space the decoder reads.
"""

from __future__ import annotations

import math

import torch

from safevlm.backbones.base import Backbone, Positions, VisionFeatures, causal_lm_loss, position_ids_from_mask


class Gemma3Backbone(Backbone):
    """``Gemma3ForConditionalGeneration``: SigLIP (fixed square grid) + pooling projector +
    Gemma 3 LM (sliding-window local and global layers, bidirectional image blocks)."""

    family = "gemma3"
    model_types = ("gemma3",)
    model_class_name = "Gemma3ForConditionalGeneration"
    variable_image_features = False  # every image the same N features (no image inputs beside pixel_values)
    # the LM head is tied to embed_tokens (no tensor of its own); none of these is a LoRA target
    fingerprint_tensors = ("embed_tokens.weight", "patch_embedding.weight", "mm_input_projection_weight")
    image_start_token = "boi_token_id"  # the prefix tokens go before <start_of_image>

    @staticmethod
    def config_facts(config) -> dict:
        vision = config.vision_config
        grid = vision.image_size // vision.patch_size
        return {
            "base_model_type": config.model_type,
            "vision_hidden_size": vision.hidden_size,
            "text_hidden_size": config.text_config.hidden_size,
            "num_image_features": grid * grid,  # the patch grid, before the projector pools it
            "vision_feature_layer": -1,  # the tower's output (after its final layer norm), as the projector reads it
            "vision_feature_select_strategy": "default",  # patch features only (SigLIP has no CLS feature)
            "image_token_id": config.image_token_id,
        }

    @property
    def fixed_image_tokens(self) -> int:
        """Image tokens per image in the prompt: ``mm_tokens_per_image`` (pooled from the grid)."""
        return int(self.config.mm_tokens_per_image)

    # -- vision --------------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor, **image_inputs) -> torch.Tensor:
        """SigLIP patch features V (num_images, N, Dv) of images (num_images, C, H, W): one pass
        of the vision tower, its ``last_hidden_state`` as the base's ``get_image_features`` reads it."""
        if pixel_values.dim() != 4:
            raise ValueError(f"{self.model_class_name} takes pixel_values (images, C, H, W), got shape "
                             f"{tuple(pixel_values.shape)}")
        dtype = next(self.vision_tower.parameters()).dtype
        return self.vision_tower(pixel_values=pixel_values.to(dtype)).last_hidden_state

    def as_vision_features(self, vision) -> VisionFeatures:
        if isinstance(vision, VisionFeatures):
            return vision
        n_images, n = vision.shape[:2]
        side = math.isqrt(n)
        lengths = torch.full((n_images,), n, dtype=torch.long, device=vision.device)
        grids = torch.tensor([[0, side, side]], dtype=torch.long, device=vision.device).expand(n_images, 3)
        return VisionFeatures(vision, lengths, grids)

    def image_token_counts(self, vision) -> torch.LongTensor:
        n_images = vision.shape[0]
        return torch.full((n_images,), self.fixed_image_tokens, dtype=torch.long, device=vision.device)

    def scatter_image_embeds(self, token_embeds, image_mask, vision) -> torch.Tensor:
        """The base projector (pool to ``mm_tokens_per_image``, norm, project) on V (num_images,
        N, Dv), written over the image tokens in order: the base's own image embeds."""
        if isinstance(vision, VisionFeatures):
            vision = vision.features
        image_embeds = self.projector(vision)
        n_images, per_image, width = image_embeds.shape
        return self._scatter(token_embeds, image_mask, image_embeds.reshape(-1, width),
                             f"{n_images} images x {per_image}")

    # -- token types: the base's bidirectional image blocks ----------------------------------------
    def base_text_inputs(self, input_ids) -> dict:
        """``token_type_ids`` (1 at image tokens), as the processor gives them: the base's own
        forward / generate read them to let each image's tokens attend to each other."""
        return {"token_type_ids": (input_ids == self.config.image_token_id).long()}

    def positions(self, llm_input_ids, attention_mask, vision=None) -> Positions:
        """1-D positions counted over attended tokens (B, L+P) and ``token_type_ids`` (B, L+P),
        1 at the image tokens of ``llm_input_ids`` (the prefix tokens' -1 and generated tokens
        are text); without ids, no image block (text positions, causal mask)."""
        types = None if llm_input_ids is None else self.base_text_inputs(llm_input_ids)["token_type_ids"]
        return Positions(position_ids_from_mask(attention_mask), token_type_ids=types)

    # -- language model --------------------------------------------------------------------------
    def language_forward(self, inputs_embeds, attention_mask, positions=None, **kwargs) -> torch.Tensor:
        """The base's own forward from embeddings (its mask builder: causal, sliding window and
        the bidirectional image blocks of ``positions.token_type_ids``) -> logits (B, L, vocab)."""
        return self._run(self.model, inputs_embeds, attention_mask, positions, **kwargs).logits

    def language_hidden(self, inputs_embeds, attention_mask, positions=None, **kwargs) -> torch.Tensor:
        """The base's decoder (``Gemma3Model``, same masks) -> final hidden states, before the LM head."""
        return self._run(self.model.model, inputs_embeds, attention_mask, positions, **kwargs)[0]

    def language_loss(self, inputs_embeds, attention_mask, positions, labels) -> torch.Tensor:
        if getattr(self.config.get_text_config(), "final_logit_softcapping", None) is not None:
            # 4.x caps the logits after the head when the config asks: the whole forward then
            return causal_lm_loss(self.language_forward(inputs_embeds, attention_mask, positions), labels)
        return super().language_loss(inputs_embeds, attention_mask, positions, labels)

    def _run(self, module, inputs_embeds, attention_mask, positions, **kwargs):
        if positions is None:
            positions = self.positions(None, attention_mask)
        if not isinstance(positions, Positions):
            positions = Positions(positions)
        return module(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                      position_ids=positions.position_ids, token_type_ids=positions.token_type_ids,
                      use_cache=False, **kwargs)

    def generate(self, model, inputs_embeds, attention_mask, positions: Positions | None = None, **kwargs):
        """The base's ``generate`` from embeddings with the prompt's ``token_type_ids``: its
        prompt pass builds the bidirectional image mask, its decoding steps are causal text
        (1-D positions follow the attention mask there). Returns the new tokens (B, T_new)."""
        from safevlm.compat import embeds_generation

        types = None if positions is None else positions.token_type_ids
        if types is not None:
            kwargs["token_type_ids"] = types.to(inputs_embeds.device)
        with embeds_generation(model):  # 5.x's Gemma 3 hides inputs_embeds from generate's check
            return model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)


__all__ = ["Gemma3Backbone"]
