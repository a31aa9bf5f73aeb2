"""The scan report's parts: the head's attention over the image patches (recomputed weights that
reproduce the head's own outputs), the patch grid per projector, the thumbnail crop, the page."""

from __future__ import annotations

import json
import re

import pytest
import torch
from scan_fixtures import TINY, encode, rows, run_cli, skimage_pictures, summary


def _model(**overrides):
    from safevlm.loading import load_model_and_processor

    return load_model_and_processor(TINY, **overrides)


@pytest.mark.parametrize("with_prompt", [False, True])
def test_recomputed_attention_reproduces_every_head_layer(with_prompt):
    """softmax(q k^T / sqrt(d)) from the layer's modules, times v, through the layer's output
    projection and FFN, gives exactly what the layer returned: the weights are the head's."""
    from safevlm.scan.attention import captured_head_inputs, layer_attention
    from safevlm.scan.pipeline import ItemBatches, run_guard

    model, processor = _model()
    pictures = list(skimage_pictures(("astronaut", "coffee", "rocket")).values())
    prompt = "What is going on here?" if with_prompt else None
    loader = ItemBatches([], processor, model.config.num_image_features, prompt)
    from safevlm.scan.sources import Item

    images, prepared = [], []
    for k, picture in enumerate(pictures):
        prepared.append(loader.prepare(Item(k, str(k), "x", "x", "bytes", data=encode(picture)), images))
    image_inputs = loader.finish(prepared, images)

    outputs = []
    hooks = [layer.register_forward_hook(lambda m, args, out: outputs.append(out)) for layer in model.safety_head.layers]
    try:
        with captured_head_inputs(model.safety_head) as calls:
            run_guard(model, processor, prepared, image_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) == len(outputs) == model.config.head_num_layers
    with torch.inference_mode():
        for (layer, (queries, keys, key_mask)), output in zip(calls, outputs):
            weights = layer_attention(layer, queries, keys, key_mask)
            b, nq, width = queries.shape
            heads = layer.num_heads
            values = layer.kv(keys).view(b, keys.shape[1], 2, heads, width // heads).permute(2, 0, 3, 1, 4)[1]
            mixed = (weights @ values.float()).transpose(1, 2).reshape(b, nq, width)
            expected = queries + layer.out(mixed.to(queries.dtype))
            expected = expected + layer.ffn(layer.norm_ffn(expected))
            assert torch.allclose(expected, output, atol=1e-5), (expected - output).abs().max()
            assert torch.allclose(weights.sum(-1), torch.ones_like(weights.sum(-1)))
            masked = ~key_mask[:, None, None, :].expand_as(weights)
            assert float(weights.masked_select(masked).abs().sum()) == 0.0  # padding / placeholders unread


@pytest.mark.parametrize("overrides, side", [({}, 4), ({"projector_kind": "cabstractor", "num_safety_features": 4}, 2)])
def test_attention_map_is_the_patch_grid_or_the_pooled_grid(overrides, side):
    from safevlm.scan.attention import attention_maps, grid_of
    from safevlm.scan.pipeline import ItemBatches
    from safevlm.scan.sources import Item

    model, processor = _model(**overrides)
    assert grid_of(model.config) == (0, side)
    loader = ItemBatches([], processor, model.config.num_image_features, None)
    images = []
    prep = loader.prepare(Item(0, "0", "x", "x", "bytes", data=encode(skimage_pictures(("coffee",))["coffee"])), images)
    (grid,) = attention_maps(model, processor, [prep], loader.finish([prep], images))
    assert grid.shape == (side, side)
    assert float(grid.sum()) == pytest.approx(1.0, abs=1e-5) and float(grid.min()) >= 0.0


def test_grid_leaves_out_the_cls_feature_of_the_full_strategy():
    from safevlm.config import SafetyConfig
    from safevlm.scan.attention import grid_of

    config = SafetyConfig(vision_hidden_size=8, text_hidden_size=8, num_image_features=577,
                          vision_feature_select_strategy="full")
    assert grid_of(config) == (1, 24)
    assert grid_of(SafetyConfig(vision_hidden_size=8, text_hidden_size=8, num_image_features=576)) == (0, 24)
    assert grid_of(SafetyConfig(vision_hidden_size=8, text_hidden_size=8, num_image_features=576,
                                projector_kind="cabstractor", num_safety_features=64)) == (0, 8)


def test_thumbnail_box_is_what_the_image_processor_keeps(tiny_processor):
    from safevlm.scan.report import model_view_box

    # shortest edge to 16 px, then a 16 x 16 centre crop: the centre square of the original
    assert model_view_box((451, 300), tiny_processor.image_processor) == pytest.approx((75.5, 0.0, 375.5, 300.0))
    assert model_view_box((200, 400), tiny_processor.image_processor) == pytest.approx((0.0, 100.0, 200.0, 300.0))


def test_report_page_holds_counts_table_histogram_and_cards(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    pictures = skimage_pictures(("astronaut", "coffee", "chelsea", "rocket", "camera"))
    for name, picture in pictures.items():
        (folder / f"{name}.jpg").write_bytes(encode(picture))
    (folder / "bad.png").write_bytes(b"nope")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "scan", "--model", TINY, "--input", folder, "--out", out, "--num-workers", "0",
                           "--no-progress", "--report-top", "2", "--prompt", "<b>look</b> & tell")
    assert code == 0, err
    html = (out / "report.html").read_text(encoding="utf-8")
    s = summary(out)
    for key in ("total", "scanned", "duplicates", "failed", "flagged"):
        assert re.search(rf'id="count-{key}">{s[key]}<', html), key
    cells = [int(n) for n in re.findall(r'<td data-count="(\d+)"', html)]
    assert sum(cells) == s["scanned"] + s["duplicates"]
    bars = [int(n) for n in re.findall(r'<rect [^>]*data-count="(\d+)"', html)]
    assert len(bars) == 20 and sum(bars) == s["scanned"] + s["duplicates"]
    cards = re.findall(r'<figure class="thumb[^"]*" data-id="([^"]+)"', html)
    by_type = {t: n for t, n in s["by_type"].items() if t != "safe"}
    assert len(cards) == sum(min(2, n) for n in by_type.values())
    assert html.count('class="photo" src="data:image/jpeg;base64,') == len(cards)
    assert html.count('class="heat" src="data:image/png;base64,') == len(cards)
    assert "&lt;b&gt;look&lt;/b&gt; &amp; tell" in html and "<b>look</b>" not in html  # prompts are escaped
    assert "bad.png" in html and "not_an_image" in html
    assert "http://" not in html and "https://" not in html  # self-contained
    levels = {r["id"]: r["risk_level"] for r in rows(out / "scan.jsonl")}
    blurred = re.findall(r'<figure class="thumb blurred" data-id="([^"]+)"', html)
    assert blurred == [c for c in cards if levels[c] >= 2]
    assert json.loads((out / "summary.json").read_text())["report"] == str(out / "report.html")
