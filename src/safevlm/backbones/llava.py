"""Backbone view of ``LlavaForConditionalGeneration`` (transformers 4.57 and 5.x).

Every image gives the same N features on a square grid, so :meth:`LlavaBackbone.vision_features`
returns a plain tensor (num_images, N, Dv); :meth:`as_vision_features` views it as a
:class:`~safevlm.backbones.base.VisionFeatures` (all lengths N, the grid after the CLS feature
when the strategy keeps it).
"""

from __future__ import annotations

import math

import torch

from safevlm.backbones.base import (
    IGNORE_INDEX,
    Backbone,
    VisionFeatures,
    causal_lm_loss,
    position_ids_from_mask,
)


class LlavaBackbone(Backbone):
    """Access to a LLaVA model's vision tower, projector, token embeddings and language model.

    The vision tower runs here and only here (:meth:`vision_features`), so one call per image
    batch serves the base projector, the safety projector and generation.
    """

    family = "llava"
    model_types = ("llava",)
    model_class_name = "LlavaForConditionalGeneration"
    image_input_keys = ()
    variable_image_features = False
    fingerprint_tensors = ("embed_tokens.weight", "patch_embedding.weight", "multi_modal_projector.linear_1.weight")

    # -- facts from the config ----------------------------------------------------------------
    @staticmethod
    def config_facts(config) -> dict:
        vision = config.vision_config
        layer = config.vision_feature_layer
        n_layers = 1 if isinstance(layer, int) else len(layer)
        strategy = config.vision_feature_select_strategy
        grid = vision.image_size // vision.patch_size
        num_features = grid * grid + (1 if strategy == "full" else 0)
        return {
            "base_model_type": config.model_type,
            "vision_hidden_size": vision.hidden_size * n_layers,
            "text_hidden_size": config.text_config.hidden_size,
            "num_image_features": num_features,
            "vision_feature_layer": layer if isinstance(layer, int) else list(layer),
            "vision_feature_select_strategy": strategy,
            "image_token_id": config.image_token_id if hasattr(config, "image_token_id") else config.image_token_index,
        }

    # -- vision --------------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor, **image_inputs) -> torch.Tensor:
        """Selected vision features V (num_images, N, Dv): one pass of the vision tower."""
        return self.selected_features(pixel_values)

    def as_vision_features(self, vision) -> VisionFeatures:
        if isinstance(vision, VisionFeatures):
            return vision
        n_images, n = vision.shape[:2]
        offset = 1 if self.config.vision_feature_select_strategy == "full" else 0
        side = math.isqrt(n - offset)
        lengths = torch.full((n_images,), n, dtype=torch.long, device=vision.device)
        grids = torch.tensor([[offset, side, side]], dtype=torch.long, device=vision.device).expand(n_images, 3)
        return VisionFeatures(vision, lengths, grids)

    def image_token_counts(self, vision) -> torch.LongTensor:
        return self.as_vision_features(vision).lengths

    def project_image_features(self, vision_features: torch.Tensor) -> torch.Tensor:
        """Base projector: V (num_images, N, Dv) -> image embeds (num_images, N, D)."""
        return self.projector(vision_features)

    def scatter_image_embeds(
        self, token_embeds: torch.Tensor, image_mask: torch.Tensor, vision_features
    ) -> torch.Tensor:
        """The LLM input of a prompt: image embeds written over its image placeholder tokens.

        token_embeds (B, L, D) from :meth:`embed_tokens`; image_mask (B, L), True at the image
        tokens, in order; vision_features V (num_images, N, Dv) -> embeds (B, L, D) where the
        image tokens hold ``base_projector(V)`` row by row. The image tokens must number
        ``num_images * N``.
        """
        if isinstance(vision_features, VisionFeatures):
            vision_features = vision_features.features
        image_embeds = self.project_image_features(vision_features)
        n_images, n_per_image, width = image_embeds.shape
        return self._scatter(token_embeds, image_mask, image_embeds.reshape(-1, width),
                             f"{n_images} images x {n_per_image}")


__all__ = ["IGNORE_INDEX", "LlavaBackbone", "causal_lm_loss", "position_ids_from_mask"]
