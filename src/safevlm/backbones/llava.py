"""Backbone view of ``LlavaForConditionalGeneration`` (transformers 4.57 and 5.x)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts ``labels[:, t + 1]``.

    logits (B, L, vocab), labels (B, L) with -100 where nothing is supervised -> scalar (float32),
    the mean over supervised tokens. A batch with no supervised token gives 0 that still
    belongs to the graph (so every rank of a distributed run takes part in backward).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits cover {tuple(logits.shape[:2])} (batch, tokens) but labels {tuple(labels.shape)}")
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    if not bool((shift_labels != IGNORE_INDEX).any()):
        return shift_logits.sum() * 0.0
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Positions (B, L) counted over attended tokens, as Hugging Face generation does (padding: 1)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


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

    def scatter_image_embeds(
        self, token_embeds: torch.Tensor, image_mask: torch.Tensor, vision_features: torch.Tensor
    ) -> torch.Tensor:
        """The LLM input of a prompt: image embeds written over its image placeholder tokens.

        token_embeds (B, L, D) from :meth:`embed_tokens`; image_mask (B, L), True at the image
        tokens, in order; vision_features V (num_images, N, Dv) -> embeds (B, L, D) where the
        image tokens hold ``base_projector(V)`` row by row. The image tokens must number
        ``num_images * N``.
        """
        image_embeds = self.project_image_features(vision_features).to(token_embeds.dtype)
        n_images, n_per_image, width = image_embeds.shape
        n_tokens = int(image_mask.sum())
        if n_tokens != n_images * n_per_image:
            raise ValueError(
                f"got {n_images * n_per_image} image features ({n_images} images x {n_per_image}) but "
                f"{n_tokens} image tokens in the prompt"
            )
        mask = image_mask.to(token_embeds.device).unsqueeze(-1)
        return token_embeds.masked_scatter(mask, image_embeds.reshape(-1, width).to(token_embeds.device))

    # -- language model --------------------------------------------------------------------------
    def language_forward(self, inputs_embeds, attention_mask, position_ids=None, **kwargs):
        """Run the decoder and LM head on embeddings (B, L, D); returns logits (B, L, vocab).

        ``position_ids`` default: counted over attended tokens (:func:`position_ids_from_mask`),
        so left padding does not shift positions.
        """
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        out = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        return self.lm_head(out[0])


__all__ = ["IGNORE_INDEX", "LlavaBackbone", "causal_lm_loss", "position_ids_from_mask"]
