"""Backbone views of the anyres LLaVA families: ``LlavaNextForConditionalGeneration`` (LLaVA-1.6)
and ``LlavaOnevisionForConditionalGeneration`` (transformers 4.57 and 5.x).

How these bases see an image (the processor and the model agree on it):

* the image processor picks the best resolution among ``image_grid_pinpoints`` for the image's
  size, cuts it into tiles of the vision tower's input size and prepends a downscaled *base
  tile* of the whole picture: ``pixel_values`` (num_images, max_tiles, C, H, W) padded with
  blank tiles, ``image_sizes`` (num_images, 2) the original (height, width);
* the vision tower runs on every real tile (one batch); the base projector maps each tile's
  features; ``pack_image_features`` lays the tiles out as one high-resolution grid, removes the
  rows / columns that only cover the letterbox padding (``unpad_image``), OneVision also
  shrinks a grid larger than ``anyres_max_9`` tiles bilinearly, and appends the learned
  ``image_newline`` embedding after every grid row; the base tile's features come first.
  An image therefore occupies ``N + rows * (cols + 1)`` tokens, different for each size.

The safety side reads the same layout *before* the base projector (newline tokens exist only
after it): the base tile's N features, then the rows x cols grid — the image's own 2-D grid
(``grids[i] = (N, rows, cols)``) that the ``cabstractor`` pools. Every layout decision is the
base's own ``pack_image_features``, called on the unprojected features, so the two sides can
never disagree.
"""

from __future__ import annotations

import torch

from safevlm.backbones.base import Backbone, VisionFeatures
from safevlm.backbones.llava import LlavaBackbone


class LlavaNextBackbone(Backbone):
    """``LlavaNextForConditionalGeneration``: CLIP tiles, Mistral / Vicuna / ... LM."""

    family = "llava_next"
    model_types = ("llava_next",)
    model_class_name = "LlavaNextForConditionalGeneration"
    image_input_keys = ("image_sizes",)
    variable_image_features = True
    fingerprint_tensors = ("embed_tokens.weight", "patch_embedding.weight", "multi_modal_projector.linear_1.weight")

    @staticmethod
    def config_facts(config) -> dict:
        facts = LlavaBackbone.config_facts(config)
        grid = config.vision_config.image_size // config.vision_config.patch_size
        facts["num_image_features"] = grid * grid  # per tile; an image has 1 + tiles of them, unpadded
        facts["variable_image_features"] = True
        return facts

    # -- the base's own layout code --------------------------------------------------------------
    modeling_module = "transformers.models.llava_next.modeling_llava_next"  # holds image_size_to_num_patches

    def _tiles_per_image(self, image_sizes) -> list[int]:
        """Tiles per image (the base tile included), by the base's own ``image_size_to_num_patches``."""
        import importlib

        image_size_to_num_patches = importlib.import_module(self.modeling_module).image_size_to_num_patches
        return [
            image_size_to_num_patches(
                image_size=size, grid_pinpoints=self.config.image_grid_pinpoints,
                patch_size=self.config.vision_config.image_size,
            )
            for size in image_sizes
        ]

    def _pack(self, per_image: list[torch.Tensor], image_sizes, image_newline=None) -> list[torch.Tensor]:
        """The base's ``pack_image_features`` on per-image tile features (n_i, N, C)."""
        packed, _ = self.model.model.pack_image_features(
            per_image, image_sizes, vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            image_newline=image_newline,
        )
        return list(packed)

    def _layout(self, tiles_per_image: list[int], n: int, image_sizes, device) -> tuple[list[int], list[tuple]]:
        """(image tokens per image, (offset, rows, cols) grid per image), read off the base's own
        packing of a 1-channel probe whose newline marker is 1: each marker ends a grid row."""
        probe = [torch.zeros(t, n, 1, device=device) for t in tiles_per_image]
        packed = self._pack(probe, image_sizes, image_newline=torch.ones(1, device=device))
        counts, grids = [], []
        side = int(round(n ** 0.5))
        for seq, tiles in zip(packed, tiles_per_image):
            counts.append(int(seq.shape[0]))
            rows = int(seq[n:, 0].sum())
            if tiles <= 1 or rows == 0:  # the base tile alone
                grids.append((0, side, side))
                continue
            cols = (seq.shape[0] - n - rows) // rows
            grids.append((n, rows, cols))
        return counts, grids

    # -- vision --------------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor, image_sizes=None, **image_inputs) -> VisionFeatures:
        """One vision-tower pass over every real tile of every image -> :class:`VisionFeatures`.

        pixel_values (num_images, max_tiles, C, H, W) as the processor pads them (or the real
        tiles already concatenated, (sum tiles, C, H, W)); image_sizes (num_images, 2).
        """
        if image_sizes is None:
            raise ValueError(f"{self.model_class_name} needs image_sizes beside pixel_values (the processor gives both)")
        image_sizes = torch.as_tensor(image_sizes)
        tiles_per_image = self._tiles_per_image(image_sizes)
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(tiles_per_image):
                raise ValueError(f"got pixel_values for {pixel_values.shape[0]} images but {len(tiles_per_image)} image_sizes")
            short = [i for i, t in enumerate(tiles_per_image) if t > pixel_values.shape[1]]
            if short:
                raise ValueError(f"images {short} need {[tiles_per_image[i] for i in short]} tiles but pixel_values hold "
                                 f"{pixel_values.shape[1]}; pass the processor's image_sizes with its pixel_values")
            pixel_values = torch.cat([pv[:t] for pv, t in zip(pixel_values, tiles_per_image)], dim=0)
        elif pixel_values.dim() != 4 or pixel_values.shape[0] != sum(tiles_per_image):
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: expected (images, tiles, C, H, W) or "
                f"({sum(tiles_per_image)} tiles, C, H, W) for these image_sizes"
            )
        tiles = self.selected_features(pixel_values)  # (sum tiles, N, Dv): THE vision pass
        per_image = list(tiles.split(tiles_per_image, dim=0))
        safety = self._pack(per_image, image_sizes)  # base tile + unpadded grid, no newlines
        counts, grids = self._layout(tiles_per_image, tiles.shape[1], image_sizes, tiles.device)
        out = VisionFeatures.pad(safety, grids, base_inputs=tuple(per_image),
                                 meta={"image_sizes": image_sizes.to(tiles.device),
                                       "image_tokens": torch.tensor(counts, dtype=torch.long, device=tiles.device)})
        return out

    def image_token_counts(self, vision) -> torch.LongTensor:
        return self.as_vision_features(vision).meta["image_tokens"]

    def scatter_image_embeds(self, token_embeds, image_mask, vision) -> torch.Tensor:
        """The base projector on every tile, packed by the base (unpad, newline per row) and
        written over the image tokens in order: the base's own image embeds."""
        vision = self.as_vision_features(vision)
        tiles = list(vision.base_inputs)
        projected = self.projector(torch.cat(tiles, dim=0))
        per_image = list(projected.split([t.shape[0] for t in tiles], dim=0))
        packed = self._pack(per_image, vision.meta["image_sizes"], image_newline=self.model.model.image_newline)
        image_embeds = torch.cat(packed, dim=0)
        sizes = [int(p.shape[0]) for p in packed]
        return self._scatter(token_embeds, image_mask, image_embeds, f"{len(sizes)} images: {sizes}")


class LlavaOnevisionBackbone(LlavaNextBackbone):
    """``LlavaOnevisionForConditionalGeneration``: SigLIP tiles (no CLS, 'full' strategy), Qwen2
    LM, grids larger than ``vision_aspect_ratio`` (``anyres_max_9``) shrunk bilinearly.

    One image per sample: the base treats a sample with several images without tiles; the
    safety head reads one image per sample, so every image here is tiled (``batch_num_images``
    of 1 each, the processor's single-image layout)."""

    family = "llava_onevision"
    model_types = ("llava_onevision",)
    model_class_name = "LlavaOnevisionForConditionalGeneration"
    modeling_module = "transformers.models.llava_onevision.modeling_llava_onevision"

    def _pack(self, per_image, image_sizes, image_newline=None):
        packed, _ = self.model.model.pack_image_features(
            per_image, image_sizes, image_newline=image_newline, vision_aspect_ratio=self.config.vision_aspect_ratio,
        )
        return list(packed)


__all__ = ["LlavaNextBackbone", "LlavaOnevisionBackbone"]
