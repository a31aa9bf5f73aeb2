"""Backbone views of the dynamic-resolution Qwen families: ``Qwen2VLForConditionalGeneration``
(Qwen2-VL) and ``Qwen2_5_VLForConditionalGeneration`` (Qwen2.5-VL), transformers 4.57 and 5.x.

How these bases see an image (the processor and the model agree on it):

* the image processor resizes the image to a multiple of ``patch_size * merge_size`` px within
  its ``min_pixels`` / ``max_pixels`` (no tiles, no letterbox) and cuts it into patches:
  ``pixel_values`` (sum of patches, C * T * P * P), the patches of every image one after the
  other, grouped so that each ``merge_size x merge_size`` block (a *merge unit*) is consecutive;
  ``image_grid_thw`` (num_images, 3) the (t, h, w) patch grid of each image (t = 1 for images);
* the vision tower (``model.model.visual``) runs over all patches at once (each image attends
  only to itself; Qwen2.5-VL reorders merge units into windows inside and back at the end), and
  its ``merger`` — the base projector, part of the tower module — maps each merge unit (the
  2 x 2 patch features concatenated) to one LLM embedding;
* the prompt holds ``<|vision_start|>``, then (h/2)(w/2) ``<|image_pad|>`` tokens, then
  ``<|vision_end|>``; M-RoPE gives each image token (t, row, col) positions and text after the
  image continues from the image's largest position (``get_rope_index``), so positions depend
  on where the image sits and on its grid.

The safety side reads the merger's input, merge unit by merge unit in raster order: feature
``r * (w/2) + c`` is the 4 patch features of merged row r, column c concatenated (width
4 * Dv), so an image's safety features form its own (h/2) x (w/2) grid (``grids[i] = (0, h/2,
w/2)``), one feature per image token. Both sides come from the one vision-tower call: a forward
hook on the merger appends its input units to its output for that call, so the tower's own
reordering (Qwen2.5-VL's windows) lays out both alike.
"""

from __future__ import annotations

import torch

from safevlm.backbones.base import Backbone, Positions, VisionFeatures, position_ids_from_mask


class Qwen2VLBackbone(Backbone):
    """``Qwen2VLForConditionalGeneration``: a dynamic-resolution ViT (merger = base projector)
    and a Qwen2 LM with M-RoPE positions."""

    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    model_class_name = "Qwen2VLForConditionalGeneration"
    image_input_keys = ("image_grid_thw",)
    variable_image_features = True
    # hub layout `model.embed_tokens` / `visual.*`, in memory `model.language_model.*` / `model.visual.*`
    fingerprint_tensors = ("embed_tokens.weight", "patch_embed.proj.weight", "merger.mlp.0.weight")
    vision_width_key = "embed_dim"  # the vision config field of the patch features' width Dv
    # the prefix tokens go before <|vision_start|>, so that M-RoPE still finds the image right after it
    image_start_token = "vision_start_token_id"

    @classmethod
    def config_facts(cls, config) -> dict:
        vision = config.vision_config
        unit = vision.spatial_merge_size ** 2
        return {
            "base_model_type": config.model_type,
            "vision_hidden_size": getattr(vision, cls.vision_width_key) * unit,  # a merge unit's features
            "text_hidden_size": config.text_config.hidden_size,
            # one safety feature per image token; an image has (h/2)(w/2) of them, by its size
            "num_image_features": 1,
            "vision_feature_layer": -1,  # the tower's last layer, as the merger reads it
            "vision_feature_select_strategy": "full",  # no CLS feature
            "image_token_id": config.image_token_id,
            "variable_image_features": True,
        }

    # -- modules -------------------------------------------------------------------------------
    @property
    def vision_tower(self):
        return self.model.model.visual

    @property
    def projector(self):
        return self.model.model.visual.merger

    # -- vision --------------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor, image_grid_thw=None, **image_inputs) -> VisionFeatures:
        """One vision-tower pass over the patches of every image -> :class:`VisionFeatures`.

        pixel_values (sum of patches, C * T * P * P) as the processor gives them;
        image_grid_thw (num_images, 3) the (t, h, w) patch grid of each image. Safety side: each
        image's merge units (t * h/2 * w/2, 4 * Dv) on its (t * h/2) x (w/2) grid; base side
        (``base_inputs``): each image's merged embeddings (t * h/2 * w/2, D), the base's own.
        """
        if image_grid_thw is None:
            raise ValueError(
                f"{self.model_class_name} needs image_grid_thw beside pixel_values (the processor gives both)"
            )
        grid_thw = torch.as_tensor(image_grid_thw).to(device=pixel_values.device, dtype=torch.long)
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
            raise ValueError(f"image_grid_thw must be (num_images, 3), got shape {tuple(grid_thw.shape)}")
        merge = self.config.vision_config.spatial_merge_size
        patches = int(grid_thw.prod(dim=1).sum())
        if pixel_values.dim() != 2 or pixel_values.shape[0] != patches:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: expected ({patches} patches, C*T*P*P) "
                f"for image_grid_thw {grid_thw.tolist()}; pass the processor's image_grid_thw with its pixel_values"
            )
        merger = self.projector
        unit_width = merger.ln_q.weight.shape[0] * merge * merge

        def with_units(module, args, output):  # the merger's output + its input units, row by row
            return torch.cat([output, args[0].reshape(-1, unit_width).to(output.dtype)], dim=-1)

        dtype = next(self.vision_tower.parameters()).dtype
        handle = merger.register_forward_hook(with_units)
        try:
            out = self.vision_tower(pixel_values.to(dtype), grid_thw=grid_thw)  # THE vision pass
        finally:
            handle.remove()
        out = out if isinstance(out, torch.Tensor) else out.pooler_output  # 4.57: a tensor; 5.x: an output
        embeds, units = out[:, :-unit_width], out[:, -unit_width:]
        counts = (grid_thw.prod(dim=1) // (merge * merge)).tolist()
        grids = [(0, int(t) * int(h) // merge, int(w) // merge) for t, h, w in grid_thw.tolist()]
        return VisionFeatures.pad(
            list(units.split(counts, dim=0)), grids, base_inputs=tuple(embeds.split(counts, dim=0)),
            meta={"image_grid_thw": grid_thw},
        )

    def image_token_counts(self, vision) -> torch.LongTensor:
        return self.as_vision_features(vision).lengths

    def scatter_image_embeds(self, token_embeds, image_mask, vision) -> torch.Tensor:
        """The merger's embeddings of every image (computed in the vision pass, as the base's
        ``get_image_features``) written over the image tokens in order."""
        vision = self.as_vision_features(vision)
        sizes = [int(e.shape[0]) for e in vision.base_inputs]
        return self._scatter(token_embeds, image_mask, torch.cat(vision.base_inputs, dim=0),
                             f"{len(sizes)} images: {sizes}")

    def base_text_inputs(self, input_ids) -> dict:
        """The token types the base's M-RoPE reads on transformers 5.x (``mm_token_type_ids``)."""
        from safevlm.compat import mm_token_type_inputs

        return mm_token_type_inputs(input_ids, self.config.image_token_id)

    # -- prefix tokens and positions -------------------------------------------------------------
    def positions(self, llm_input_ids, attention_mask, vision=None) -> Positions:
        """M-RoPE positions (3, B, L+P) by the base's own ``get_rope_index`` over ``llm_input_ids``
        (the prefix tokens' ``PREFIX_TOKEN_ID`` -1 counts as text) and ``rope_deltas`` (B, 1) =
        largest attended position + 1 - L-P: where decoding continues (``cache_position + rope_deltas``)."""
        from safevlm.compat import mrope_position_ids

        if llm_input_ids is None:  # no ids to read the image from: text positions on all three axes
            position_ids = position_ids_from_mask(attention_mask).unsqueeze(0).expand(3, -1, -1)
        else:
            grid_thw = None if vision is None else self.as_vision_features(vision).meta["image_grid_thw"]
            position_ids = mrope_position_ids(self.model.model, llm_input_ids, grid_thw, attention_mask,
                                              self.config.image_token_id)
        attended = attention_mask.bool().to(position_ids.device).unsqueeze(0)
        largest = position_ids.masked_fill(~attended, -1).amax(dim=(0, 2))
        rope_deltas = (largest + 1 - attention_mask.shape[1]).unsqueeze(1)
        return Positions(position_ids, rope_deltas)

    # -- language model --------------------------------------------------------------------------
    def generate(self, model, inputs_embeds, attention_mask, positions: Positions | None = None, **kwargs):
        """The base's ``generate`` from embeddings, with M-RoPE positions made exact: a forward
        pre-hook on the language model gives the prompt pass ``positions.position_ids`` and every
        later pass (past length c, n new tokens) positions ``c .. c+n-1`` + ``rope_deltas`` on all
        three axes, whatever the base's own generation code derives from embeddings alone (it
        cannot see the image there). Returns the new tokens (B, T_new)."""
        if positions is None:
            positions = self.positions(None, attention_mask)
        prompt = positions.position_ids.to(inputs_embeds.device)
        deltas = positions.rope_deltas.to(inputs_embeds.device)
        seen = [0]  # tokens in the KV cache before the current pass

        def exact_positions(module, args, call_kwargs):
            embeds = call_kwargs.get("inputs_embeds")
            if embeds is None:  # pragma: no cover - the Qwen models always pass embeddings
                return None
            batch, n = embeds.shape[:2]
            past = seen[0]
            if past == 0:
                if n != prompt.shape[-1]:
                    raise RuntimeError(f"the prompt pass has {n} tokens but the positions cover {prompt.shape[-1]}")
                position_ids = prompt
            else:
                steps = torch.arange(past, past + n, device=embeds.device)
                position_ids = (steps.view(1, 1, n) + deltas.view(1, -1, 1)).expand(3, -1, -1)
            if batch != position_ids.shape[1]:  # num_beams / num_return_sequences expand each row
                position_ids = position_ids.repeat_interleave(batch // position_ids.shape[1], dim=1)
            call_kwargs["position_ids"] = position_ids
            seen[0] = past + n
            return args, call_kwargs

        inner = self.model.model
        rope_deltas = getattr(inner, "rope_deltas", None)
        handle = self.language_model.register_forward_pre_hook(exact_positions, with_kwargs=True)
        try:
            return model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        finally:
            handle.remove()
            inner.rope_deltas = rope_deltas  # the base's own generation state, as it was


class Qwen2_5_VLBackbone(Qwen2VLBackbone):
    """``Qwen2_5_VLForConditionalGeneration``: as Qwen2-VL, with window attention in the vision
    tower (merge units reordered into windows and back), an RMSNorm / SwiGLU ViT and
    ``hidden_size`` naming the patch features' width."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    model_class_name = "Qwen2_5_VLForConditionalGeneration"
    vision_width_key = "hidden_size"


__all__ = ["Qwen2VLBackbone", "Qwen2_5_VLBackbone"]
