"""Backbone view of ``LlavaForConditionalGeneration`` (transformers 4.57 and 5.x)."""

from __future__ import annotations

import torch
from torch import nn


class LlavaBackbone:
    """Access to a LLaVA model's vision tower, projector, token embeddings and language model.

    The vision tower runs here and only here (:meth:`vision_features`), so one call per image
    batch serves the base projector, the safety projector and generation.
    """

    def __init__(self, model: nn.Module):
        if not hasattr(model, "model") or not hasattr(model, "lm_head"):
            raise ValueError(
                f"{type(model).__name__} does not look like LlavaForConditionalGeneration "
                "(needs .model and .lm_head)"
            )
        self.model = model
        self.config = model.config

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

    # -- modules -------------------------------------------------------------------------------
    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def embed_tokens(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Token embeddings (B, L, D)."""
        return self.model.get_input_embeddings()(input_ids)

    # -- vision --------------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Selected vision features V (num_images, N, Dv): one pass of the vision tower."""
        config = self.config
        layer = config.vision_feature_layer
        dtype = next(self.vision_tower.parameters()).dtype
        outputs = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True)
        layers = [layer] if isinstance(layer, int) else list(layer)
        hidden = [outputs.hidden_states[i] for i in layers]
        if config.vision_feature_select_strategy == "default":
            hidden = [h[:, 1:] for h in hidden]
        return hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1)

    def project_image_features(self, vision_features: torch.Tensor) -> torch.Tensor:
        """Base projector: V (num_images, N, Dv) -> image embeds (num_images, N, D)."""
        return self.projector(vision_features)

    # -- language model --------------------------------------------------------------------------
    def language_forward(self, inputs_embeds, attention_mask, position_ids=None, **kwargs):
        """Run the decoder and LM head on embeddings; returns logits (B, L, vocab)."""
        out = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        return self.lm_head(out[0])
