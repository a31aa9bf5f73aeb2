"""Where the safety head looks: its attention over the image part of its keys, as a patch grid.

The head's learned queries attend over ``[safety features ; prompt tokens]``
(:class:`safevlm.modules.head.SafetyHead`). Its layers use fused attention, which returns no
weights, so the weights are recomputed here from each layer's own modules (``norm_q``, ``q``,
``kv``, the key mask) on the inputs the layer received, caught by forward pre-hooks: the head
is not changed. ``tests/test_scan_report.py`` checks that these weights reproduce the layers'
outputs.

The map is the attention averaged over layers, heads and queries, restricted to the safety
features and renormalised to sum to 1:

* ``mlp`` projector: one safety feature per vision patch (M = N), so the map is the patch
  grid itself (24 x 24 for LLaVA-1.5; the CLS feature, present with the ``full`` strategy, is
  left out);
* ``cabstractor``: M pooled tokens on a sqrt(M) x sqrt(M) grid (8 x 8 by default), each the
  average of a block of patches: a coarser map of the same image area, upsampled for display;
* ``mlp`` on a base whose images give variable numbers of features (LLaVA-NeXT / OneVision
  tiles, Qwen2-VL dynamic resolution: ``variable_image_features``): the map is the image's own
  rows x cols feature grid (``VisionFeatures.grids``: LLaVA-NeXT's unpadded high-resolution grid
  after the base tile, Qwen2-VL's merged-patch grid), which covers the whole image.
"""

from __future__ import annotations

import contextlib
import math


@contextlib.contextmanager
def captured_head_inputs(head):
    """Within the block, every call of a head layer appends ``(layer, (queries, keys, key_mask))``."""
    calls: list = []
    hooks = [layer.register_forward_pre_hook(lambda module, args: calls.append((module, args)))
             for layer in head.layers]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def layer_attention(layer, queries, keys, key_mask):
    """Attention weights (B, heads, Q, K), float32, of one cross-attention layer on its inputs:
    softmax(q k^T / sqrt(d)) over the attended keys, as the layer's fused attention computes."""
    import torch

    b, nq, width = queries.shape
    heads = layer.num_heads
    d = width // heads
    q = layer.q(layer.norm_q(queries)).view(b, nq, heads, d).transpose(1, 2)
    k = layer.kv(keys).view(b, keys.shape[1], 2, heads, d).permute(2, 0, 3, 1, 4)[0]
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(~key_mask[:, None, None, :].bool(), float("-inf"))
    return torch.softmax(scores, dim=-1)


def grid_of(config) -> tuple[int, int]:
    """(first safety feature on the grid, grid side) for a SafetyConfig: the CLS feature of the
    ``full`` strategy is skipped with the mlp projector. Side 0 when the features are no square,
    or when each image has its own grid (mlp on a variable-length base: see :func:`attention_grid`)."""
    if config.projector_kind == "cabstractor":
        count, skip = config.num_safety_features, 0
    elif config.variable_image_features:
        return 0, 0
    else:
        skip = 1 if config.vision_feature_select_strategy == "full" else 0
        count = config.num_image_features - skip
    side = math.isqrt(count)
    return skip, (side if side * side == count else 0)


def attention_grid(calls, config, image_grid=None):
    """The map (rows, cols) numpy float32, summing to 1, from the captured calls of ONE head
    pass over ONE sample; None when the head read no image or the features form no grid.

    ``image_grid``: (offset, rows, cols) of the sample's own feature grid
    (``VisionFeatures.grids``), the map of the mlp projector on a variable-length base; the
    other maps are square (:func:`grid_of`)."""
    import numpy as np
    import torch

    if config.projector_kind != "cabstractor" and config.variable_image_features:
        if image_grid is None:
            return None
        skip, rows, cols = (int(x) for x in image_grid)
    else:
        skip, rows = grid_of(config)
        cols = rows
    m = skip + rows * cols
    if not calls or rows * cols == 0:
        return None
    total = None
    with torch.inference_mode():
        for layer, (queries, keys, key_mask) in calls:
            if keys.shape[1] < m:
                return None
            weights = layer_attention(layer, queries, keys, key_mask).mean(dim=(1, 2))[0]  # (K,)
            total = weights if total is None else total + weights
    image_part = total[skip:m].double()
    mass = float(image_part.sum())
    if mass <= 0:
        return None
    grid = (image_part / mass).reshape(rows, cols)
    return grid.cpu().numpy().astype(np.float32) if isinstance(grid, torch.Tensor) else grid


def attention_maps(model, processor, prepared: list, image_inputs) -> list:
    """One attention map (or None) per prepared item, each from its own head pass (so the
    captured calls belong to one sample); the same vision + head path as the scan.
    ``image_inputs``: the :class:`~safevlm.backbones.ImageInputs` of the items' images
    (:meth:`~safevlm.scan.pipeline.ItemBatches.finish`)."""
    import torch

    from safevlm.scan.pipeline import encode_rows, run_guard

    maps = []
    for prep in prepared:
        if prep.error is not None or prep.pixel_row is None:
            maps.append(None)
            continue
        single = type(prep)(**{**prep.__dict__, "pixel_row": 0})
        with torch.inference_mode():
            features = encode_rows(model, image_inputs, [prep.pixel_row])  # its grid, and the head's input below
        image_grid = model.backbone.as_vision_features(features).grids[0].tolist()
        with torch.inference_mode(), captured_head_inputs(model.safety_head) as calls:
            run_guard(model, processor, [single], None, features=features)
        maps.append(attention_grid(calls, model.config, image_grid))
    return maps


__all__ = ["attention_grid", "attention_maps", "captured_head_inputs", "grid_of", "layer_attention"]
