"""Vision-feature cache: keys, invalidation, shards, cached batches equal uncached ones."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from train_fixtures import SAFETY_TEST_SIZES, keyword_records, png_bytes

from safevlm.data import SafetyCollator
from safevlm.model import SafeVLM
from safevlm.train.cache import (
    CachedFeatureCollator,
    FeatureCache,
    ImageHasher,
    cache_identity,
    image_encoder,
    record_image_keys,
)


@pytest.fixture
def model(tiny):
    torch.manual_seed(0)
    return SafeVLM(tiny[0], **SAFETY_TEST_SIZES).eval()


@pytest.fixture
def filled(tmp_path, model, tiny_processor):
    records = keyword_records(10, seed=1)
    keys = record_image_keys(records)
    cache = FeatureCache.for_model(tmp_path / "cache", model, tiny_processor.image_processor)
    computed = cache.fill(image_encoder(model, tiny_processor), [(keys[r.id], r) for r in records],
                          batch_size=4, shard_size=6)
    return records, keys, cache, computed


def test_fill_writes_shards_atomically_and_a_second_fill_computes_nothing(filled, tmp_path, model, tiny_processor):
    records, keys, cache, computed = filled
    assert computed == len(set(keys.values())) == 10
    shards = sorted(cache.dir.glob("shard-*.safetensors"))
    assert len(shards) == 2  # 10 images, 6 per shard
    assert not list(cache.dir.glob("*.tmp")) and (cache.dir / "identity.json").is_file()
    again = FeatureCache.for_model(tmp_path / "cache", model, tiny_processor.image_processor)
    assert len(again) == 10
    assert again.fill(image_encoder(model, tiny_processor), [(keys[r.id], r) for r in records]) == 0


def test_cached_features_equal_the_vision_pass(filled, model, tiny_processor):
    records, keys, cache, _ = filled
    from safevlm.data import open_image

    pixels = tiny_processor.image_processor([open_image(r) for r in records[:3]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        direct = model.encode_images(pixels)
    cached = cache.get_batch([keys[r.id] for r in records[:3]])
    assert cached.shape == (3, model.config.num_image_features, model.config.vision_hidden_size)
    torch.testing.assert_close(cached, direct, atol=1e-5, rtol=1e-5)


def test_cached_batch_matches_the_plain_collator(filled, model, tiny_processor):
    records, keys, cache, _ = filled
    plain = SafetyCollator(tiny_processor, num_prefix_tokens=4)
    batch = plain(records[:4])
    cached = CachedFeatureCollator(plain, cache, keys, model.config.num_image_features)(records[:4])
    assert "pixel_values" not in cached
    for key in ("input_ids", "attention_mask", "labels", "risk_level", "risk_type"):
        assert torch.equal(batch[key], cached[key]), key
    with torch.no_grad():
        a = model(**batch)
        b = model(**cached)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.type_logits, b.type_logits, atol=1e-5, rtol=1e-5)


def test_one_placeholder_batch_gives_the_same_head_output_without_the_llm(filled, model, tiny_processor):
    records, keys, cache, _ = filled
    plain = SafetyCollator(tiny_processor, num_prefix_tokens=4)
    full = CachedFeatureCollator(plain, cache, keys, model.config.num_image_features)(records[:4])
    short = CachedFeatureCollator(plain, cache, keys, 1)(records[:4])
    assert short["input_ids"].shape[1] == full["input_ids"].shape[1] - (model.config.num_image_features - 1)
    with torch.no_grad():
        a = model(**full, compute_lm=False)
        b = model(**short, compute_lm=False)
    torch.testing.assert_close(a.level_logits, b.level_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.type_logits, b.type_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.level_loss, b.level_loss, atol=1e-5, rtol=1e-5)


def test_namespace_changes_with_vision_weights_layer_and_processor_but_not_the_llm(model, tiny_processor):
    base_id = FeatureCache("x", cache_identity(model, tiny_processor.image_processor)).namespace

    llm_changed = copy.deepcopy(model)
    with torch.no_grad():
        llm_changed.backbone.lm_head.weight.add_(1.0)
    assert FeatureCache("x", cache_identity(llm_changed, tiny_processor.image_processor)).namespace == base_id

    vision_changed = copy.deepcopy(model)
    with torch.no_grad():
        next(vision_changed.backbone.vision_tower.parameters()).view(-1)[0] += 1e-3
    assert FeatureCache("x", cache_identity(vision_changed, tiny_processor.image_processor)).namespace != base_id

    layer_changed = copy.deepcopy(model)
    layer_changed.backbone.config.vision_feature_layer = -1
    assert FeatureCache("x", cache_identity(layer_changed, tiny_processor.image_processor)).namespace != base_id

    processor = copy.deepcopy(tiny_processor.image_processor)
    processor.image_mean = [0.5, 0.5, 0.5]
    assert FeatureCache("x", cache_identity(model, processor)).namespace != base_id


def test_keys_follow_image_content_not_names(tmp_path):
    from safevlm.data import SafetyRecord, Turn

    (tmp_path / "a.png").write_bytes(png_bytes(1))
    shutil.copy(tmp_path / "a.png", tmp_path / "copy.png")
    (tmp_path / "b.png").write_bytes(png_bytes(2))

    def rec(i, image):
        return SafetyRecord(id=str(i), image=image, turns=[Turn("user", "hi")], risk_level=0, risk_type=6, source="t")

    hasher = ImageHasher(tmp_path / "cache")
    keys = record_image_keys([rec(0, "a.png"), rec(1, "copy.png"), rec(2, "b.png"), rec(3, png_bytes(1))], tmp_path, hasher)
    assert keys["0"] == keys["1"] == keys["3"] != keys["2"]
    hasher.save()
    # editing a file changes its key (the memo is keyed by size and mtime as well as the path)
    (tmp_path / "a.png").write_bytes(png_bytes(3))
    keys2 = record_image_keys([rec(0, "a.png")], tmp_path, ImageHasher(tmp_path / "cache"))
    assert keys2["0"] != keys["0"]
    with pytest.raises(ValueError, match="escapes the image root"):
        record_image_keys([rec(4, "../outside.png")], tmp_path)


def test_other_ranks_shards_are_seen_after_refresh(filled, tmp_path, model, tiny_processor):
    records, keys, cache, _ = filled
    other = FeatureCache.for_model(tmp_path / "cache", model, tiny_processor.image_processor)
    extra = keyword_records(2, seed=9, prefix="x")
    extra_keys = record_image_keys(extra)
    other.fill(image_encoder(model, tiny_processor), [(extra_keys[r.id], r) for r in extra])
    assert extra_keys["x0"] not in cache
    cache.refresh()
    assert extra_keys["x0"] in cache and len(cache) == 12
    with pytest.raises(KeyError, match="is not in the feature cache"):
        cache.get("0" * 64)


def test_fill_splits_the_work_between_ranks(tmp_path, model, tiny_processor):
    records = keyword_records(7, seed=4)
    keys = record_image_keys(records)
    items = [(keys[r.id], r) for r in records]
    encode = image_encoder(model, tiny_processor)
    first = FeatureCache.for_model(tmp_path / "c", model, tiny_processor.image_processor)
    assert first.fill(encode, items, rank=0, world_size=2) == 4
    # rank 1 looks later and already sees rank 0's shard: its share must not shift
    second = FeatureCache.for_model(tmp_path / "c", model, tiny_processor.image_processor)
    assert second.fill(encode, items, rank=1, world_size=2) == 3
    second.refresh()
    assert not second.missing(keys.values())
    with pytest.raises(ValueError, match="rank must be in"):
        second.fill(encode, items, rank=2, world_size=2)


def test_a_fixed_grid_base_keeps_the_format_1_identity(model, tiny_processor):
    """Variable-length families got their own cache format (2); a LLaVA-1.5 cache keeps the
    identity it had (same fields, format 1), so caches written before are still found."""
    identity = cache_identity(model, tiny_processor.image_processor)
    assert identity["format"] == 1 and set(identity) == {
        "format", "image_loader", "vision_tower_sha256", "vision_config", "vision_feature_layer",
        "vision_feature_select_strategy", "image_processor"}
    assert not FeatureCache("x", identity).variable
    # the whole processor and its image processor name the same cache
    assert FeatureCache("x", cache_identity(model, tiny_processor)).namespace == FeatureCache("x", identity).namespace
