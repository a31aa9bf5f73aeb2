"""Every supported VLM family beyond LLaVA-1.5, on tiny bases built from configs.

One :class:`Family` entry per family in :data:`FAMILIES`; every test is parametrised over it,
so a new family is one more entry (and a backbone). docs/families.md's table is generated from
this module (:func:`families_table`) and checked by :func:`test_docs_table_is_current`.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from safevlm.cli import main
from safevlm.model import SafeVLM

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Family:
    name: str  # the backbone family (safevlm tiny build --family NAME)
    model_class: str  # the plain transformers class
    release: str  # safevlm params --base NAME: its 7B-class release
    published_params: int  # that release's published parameter count (exact), or our count when only
    sizes: tuple  # (height, width) of images that tile into non-square, multi-tile grids, all different
    # 'anyres': a base tile, then a rows x cols grid of tiles with one newline token per grid row;
    # 'dynamic': the image resized to its own rows x cols grid of merged patches, one token each;
    # 'fixed': every image resized to one square grid of N features, pooled to a fixed number of
    # image tokens (Gemma 3), like LLaVA-1.5's
    layout: str = "anyres"
    # only a rounded count is published (e.g. "8.03B"): ``published_params`` is then our own count,
    # checked to round to it
    published_rounded: str | None = None
    # whether the base's attention mask reads the image layout: 'bidirectional' within each image's
    # block (Gemma 3, from token_type_ids), else plain 'causal'
    image_mask: str = "causal"
    # more releases of the family (`params --base`) and their published counts
    more_releases: tuple = ()

    @property
    def variable(self) -> bool:
        """Whether the family's images give each its own number of features."""
        return self.layout != "fixed"


FAMILIES = [
    Family("llava_next", "LlavaNextForConditionalGeneration", "llava-v1.6-mistral-7b", 7_566_747_648,
           ((20, 44), (36, 30), (24, 24))),
    Family("llava_onevision", "LlavaOnevisionForConditionalGeneration", "llava-onevision-qwen2-7b-ov",
           8_030_807_584, ((20, 44), (36, 30), (24, 24)), published_rounded="8.03B"),
    # 16-px min / 48-px max side at 8 px a merged patch: grids 2x6, 4x4 and 3x3
    Family("qwen2_vl", "Qwen2VLForConditionalGeneration", "qwen2-vl-7b-instruct", 8_291_375_616,
           ((20, 44), (36, 30), (24, 24)), layout="dynamic"),
    Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "qwen2.5-vl-7b-instruct", 8_292_166_656,
           ((20, 44), (36, 30), (24, 24)), layout="dynamic"),
    # every image resized to 16 x 16 px: an 8 x 8 SigLIP grid pooled to 4 x 4 = 16 image tokens.
    # gemma-3-4b-it: 4,300,079,472 and gemma-3-12b-it: 12,187,325,040 (the releases' safetensors metadata)
    Family("gemma3", "Gemma3ForConditionalGeneration", "gemma-3-4b-it", 4_300_079_472,
           ((20, 44), (36, 30), (24, 24)), layout="fixed", image_mask="bidirectional",
           more_releases=(("gemma-3-12b-it", 12_187_325_040),)),
]
IDS = [f.name for f in FAMILIES]
SMALL = {"num_query_tokens": 4, "head_num_heads": 4}


def _preset(family: Family) -> str:
    from safevlm.tiny import preset_name

    return preset_name(family.name, "test")


_BUILT: dict[str, tuple] = {}


@pytest.fixture(params=FAMILIES, ids=IDS)
def family(request):
    return request.param


@pytest.fixture
def tiny_family(family):
    """(family, base, processor) of the family's 'test' preset, built once per session (do not mutate the base)."""
    from safevlm.tiny import build_tiny

    torch.set_num_threads(2)
    if family.name not in _BUILT:
        _BUILT[family.name] = build_tiny(_preset(family), seed=0)
    return (family, *_BUILT[family.name])


def image(size: tuple[int, int], seed: int = 0, colour=None):
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    noise = rng.random((h, w, 3))
    pixels = noise * 255 if colour is None else np.clip(np.array(colour) + (noise - 0.5) * 40, 0, 255)
    return Image.fromarray(pixels.astype("uint8"))


def chat_inputs(processor, prompts, sizes, seed: int = 0):
    """The processor's own inputs for one image (of each size) per prompt, chat-formatted, left-padded."""
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True
        )
        for p in prompts
    ]
    images = [[image(s, seed + i)] for i, s in enumerate(sizes)]  # one list of images per prompt
    processor.tokenizer.padding_side = "left"
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def vision_inputs(model, inputs) -> dict:
    """``pixel_values`` and the family's other image inputs (``image_sizes``, ``image_grid_thw``)
    of a processor output, for :meth:`SafeVLM.encode_images`."""
    return {k: inputs[k] for k in ("pixel_values", *model.backbone.image_input_keys)}


def _hook_calls(module, fail: bool = False):
    calls = []

    def hook(*args, **kwargs):
        if fail:
            raise AssertionError(f"{type(module).__name__} was called")
        calls.append(1)

    return calls, module.register_forward_pre_hook(hook)


# ---------------------------------------------------------------------------------------- tiny
def test_tiny_build_loads_with_the_plain_class_and_auto_processor(tmp_path, family):
    import transformers

    from safevlm.backbones import image_prompt
    from safevlm.compat import processor_load_kwargs
    from safevlm.loading import load_model_and_processor
    from safevlm.tiny import build_tiny

    out = tmp_path / family.name
    assert main(["tiny", "build", "--family", family.name, "--preset", "test", "--seed", "3", "--out", str(out)]) == 0
    model = getattr(transformers, family.model_class).from_pretrained(out)
    processor = transformers.AutoProcessor.from_pretrained(out, **processor_load_kwargs())
    assert type(model).__name__ == family.model_class
    rebuilt, built_processor = build_tiny(_preset(family), seed=3)
    assert type(processor) is type(built_processor)
    for (name, a), b in zip(rebuilt.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert model.config.text_config.hidden_size == 32 and model.config.text_config.num_hidden_layers == 2
    assert processor.tokenizer.convert_tokens_to_ids(image_prompt(processor).token) == model.config.image_token_id
    # the reloaded processor expands <image> exactly as the model lays the image out: the base's own forward runs
    inputs = chat_inputs(processor, ["What is it?"], family.sizes[:1])
    with torch.no_grad():
        theirs = model(**inputs).logits
    # the one loader takes the folder and the tiny: spec alike
    for spec in (out, f"tiny:{_preset(family)}@3"):
        safe, loaded_processor = load_model_and_processor(spec, num_prefix_tokens=0, **SMALL)
        assert type(safe.backbone.model).__name__ == family.model_class
        with torch.no_grad():
            ours = safe(**chat_inputs(loaded_processor, ["What is it?"], family.sizes[:1])).logits
        assert (ours - theirs).abs().max().item() <= 1e-5, spec


def test_processor_counts_match_the_models_layout(tiny_family):
    from safevlm.backbones import process_images

    family, base, processor = tiny_family
    model = SafeVLM(base, **SMALL).eval()
    images = [image(s, i) for i, s in enumerate(family.sizes)]
    inputs = process_images(processor, images)  # the processor's own expansion, counted
    raw = model.encode_images(**inputs.tensors)
    vision = model.backbone.as_vision_features(raw)
    counts = model.backbone.image_token_counts(raw).tolist()
    assert counts == inputs.num_tokens
    if not family.variable:  # one square grid of N features for every size, pooled by the base projector
        n = vision.shape[1]
        assert counts == [model.backbone.fixed_image_tokens] * len(images) and counts[0] < n
        assert vision.grids.tolist() == [[0, math.isqrt(n), math.isqrt(n)]] * len(images) and math.isqrt(n) ** 2 == n
        with torch.no_grad():
            assert model.backbone.projector(raw).shape[:2] == (len(images), counts[0])
        return
    assert len(set(counts)) == len(counts)  # every size its own layout
    assert vision.lengths.tolist() != [vision.shape[1]] * len(images)  # padded rows
    for (offset, rows, cols), length, count in zip(vision.grids.tolist(), vision.lengths.tolist(), counts):
        assert offset + rows * cols == length  # (the base tile, then) the rows x cols grid
        newlines = rows if family.layout == "anyres" else 0  # anyres: one newline token per grid row
        assert count == length + newlines


def test_gemma3_pan_and_scan_crops_are_refused():
    """Gemma 3's pan-and-scan (off by default) turns one image into several crops, which the base
    reads as more images: the one image path refuses such a processor by name, and a batch the
    processor made with crops stops at the one-image-per-sample check."""
    from safevlm.backbones import image_prompt, process_images
    from safevlm.data import SafetyCollator
    from safevlm.tiny import build_tiny

    base, processor = build_tiny("gemma3_test", seed=0)
    model = SafeVLM(base, **SMALL).eval()
    wide = image((16, 64), 0)  # 4:1, over pan-and-scan's 1.2 ratio
    crops = processor(images=[[wide]], text=[image_prompt(processor).placeholder + " hi"], return_tensors="pt",
                      do_pan_and_scan=True, pan_and_scan_min_crop_size=8)
    assert crops["pixel_values"].shape[0] > 1  # the crops are real: more pixel rows than images
    with pytest.raises(ValueError, match="exactly one image per sample"):
        model.guard(**crops)
    processor.image_processor.do_pan_and_scan = True
    for call in (lambda: process_images(processor, [wide]), lambda: model.backbone.image_inputs(processor, [wide]),
                 lambda: SafetyCollator(processor)(_records(1, [(16, 64)]))):
        with pytest.raises(ValueError, match=r"Gemma3ImageProcessor\w* has do_pan_and_scan=true \(preprocessor_config"):
            call()


# -------------------------------------------------------------------------------- transparency
def test_transparency_without_prefix_tokens_on_a_multi_tile_image(tiny_family):
    family, base, processor = tiny_family
    model = SafeVLM(base, num_prefix_tokens=0, **SMALL).eval()
    inputs = chat_inputs(processor, ["What is shown in the image?", "Describe it."], family.sizes[:2])
    vision = model.backbone.as_vision_features(model.encode_images(**vision_inputs(model, inputs)))
    rows, cols = vision.grids[0, 1:].tolist()
    if family.layout == "anyres":
        assert inputs["pixel_values"].shape[1] >= 3  # the base tile + at least two tiles
    if family.variable:
        assert min(rows, cols) > 1 and rows != cols  # a non-square 2-D grid
    else:  # a non-square image, resized to the one square grid
        assert family.sizes[0][0] != family.sizes[0][1] and rows == cols > 1
    with torch.no_grad():
        ours = model(**inputs).logits
        theirs = base(**inputs).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-5


def position_sensitive(base):
    """A copy of ``base`` whose language model matrices have unit gain (std 1/sqrt(fan in)): at
    the tiny models' 0.02 init attention is nearly uniform and greedy tokens hardly depend on
    positions; at this scale wrong position ids (M-RoPE deltas...) change them."""
    import copy
    import math

    sensitive = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in sensitive.named_parameters():
            if param.dim() == 2 and "vision" not in name and "visual" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[1]))
    return sensitive


def test_kv_cache_generation_matches_no_cache_greedy_decode(tiny_family):
    family, base, processor = tiny_family
    base = position_sensitive(base)
    torch.manual_seed(0)
    model = SafeVLM(base, num_prefix_tokens=3, **SMALL).eval()
    with torch.no_grad():
        model.prefix_tokens.condition.weight.normal_(std=0.5)  # the head's state conditions the prefix
        model.prefix_tokens.embeddings.normal_(std=1.0)
    inputs = chat_inputs(processor, ["Hi?", "Please describe every object in the picture."], family.sizes[:2])
    steps = 6
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    new, cached_logits = out.sequences, torch.stack(out.logits, dim=1).float()
    assert new.shape == (2, steps)

    eos = base.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    with torch.no_grad():
        vision = model.encode_images(**vision_inputs(model, inputs))
        llm = model.language_inputs(inputs["input_ids"], inputs["attention_mask"], vision)
        embeds, mask, ids = llm.inputs_embeds, llm.attention_mask, llm.input_ids
        # the prefix tokens sit right before the image block (its opening marker, where it has one)
        backbone = model.backbone
        opens = (getattr(backbone.config, backbone.image_start_token) if backbone.image_start_token
                 else backbone.config.image_token_id)
        for row in ids:
            start = int((row == -1).int().argmax())
            assert row[start:start + 3].tolist() == [-1] * 3 and row[start + 3].item() == opens
        reference, reference_logits = [], []
        for step in range(steps):  # the whole sequence again each step: no cache
            positions = model.backbone.positions(ids, mask, vision)
            logits = model.backbone.language_forward(embeds, mask, positions)[:, -1].float()
            if family.image_mask == "bidirectional" and step == 0:
                # the image tokens are the prompt's only bidirectional block, and it is read: without
                # it (a causal mask) the prompt's last logits move
                assert torch.equal(positions.token_type_ids.bool(), ids == model.config.image_token_id)
                causal = replace(positions, token_type_ids=None)
                assert (model.backbone.language_forward(embeds, mask, causal)[:, -1] - logits).abs().max() > 1e-3
            reference_logits.append(logits.clone())
            logits[:, eos] = float("-inf")  # min_new_tokens
            token = logits.argmax(-1)
            reference.append(token)
            embeds = torch.cat([embeds, model.backbone.embed_tokens(token[:, None])], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            ids = torch.cat([ids, token[:, None]], dim=1)
    assert torch.equal(new, torch.stack(reference, dim=1))
    # and every step's logits (the raw ones, before min_new_tokens), not only their argmax
    assert (cached_logits - torch.stack(reference_logits, dim=1)).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------- one vision pass
def test_vision_tower_runs_once_and_guard_never_calls_the_llm(tiny_family):
    family, base, processor = tiny_family
    model = SafeVLM(base, num_prefix_tokens=2, **SMALL).eval()
    inputs = chat_inputs(processor, ["What is it?", "Describe it."], family.sizes[:2])
    vision_calls, vision_handle = _hook_calls(model.backbone.vision_tower)
    try:
        with torch.no_grad():
            out = model(**inputs, risk_level=torch.tensor([0, 2]), risk_type=torch.tensor([6, 1]))
        assert len(vision_calls) == 1 and out.logits.shape[1] == inputs["input_ids"].shape[1] + 2
        vision_calls.clear()
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert len(vision_calls) == 1
        vision_calls.clear()
        _, lm_handle = _hook_calls(model.backbone.language_model, fail=True)
        _, head_handle = _hook_calls(model.backbone.lm_head, fail=True)
        try:
            guard = model.guard(**inputs)
            image_only = model.guard(None, vision_features=guard.vision_features)
        finally:
            lm_handle.remove()
            head_handle.remove()
        assert len(vision_calls) == 1
    finally:
        vision_handle.remove()
    torch.testing.assert_close(guard.level_logits, out.level_logits, atol=1e-6, rtol=0)
    assert image_only.type_probs.shape == (2, 7)


def test_generate_guarded_runs_with_one_vision_pass(tiny_family):
    from safevlm.guarded import generate_guarded

    family, base, processor = tiny_family
    model = SafeVLM(base, num_prefix_tokens=2, **SMALL).eval()
    images = [image(s, i) for i, s in enumerate(family.sizes)]
    calls, handle = _hook_calls(model.backbone.vision_tower)
    try:
        results = generate_guarded(model, processor, images, ["What is it?", "Describe it.", "Hi"],
                                   max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    assert len(calls) == 1 and len(results) == 3
    assert all(r.action in ("allow", "hint", "refuse") and r.error is None for r in results)
    # the head's decision for each input is the one guard gives that input alone
    for i, r in enumerate(results):
        alone = model.guard(**chat_inputs(processor, [["What is it?", "Describe it.", "Hi"][i]], [family.sizes[i]], seed=i))
        assert abs(r.level_probs[0] - alone.level_probs[0, 0].item()) < 1e-4


# ---------------------------------------------------------------------- variable-length features
@pytest.mark.parametrize("projector", ["mlp", "cabstractor"])
def test_head_is_padding_invariant_with_images_of_different_sizes(tiny_family, projector):
    family, base, processor = tiny_family
    extra = {"num_safety_features": 4} if projector == "cabstractor" else {}
    torch.manual_seed(0)
    model = SafeVLM(base, projector_kind=projector, num_prefix_tokens=2, **SMALL, **extra).eval()
    prompts = ["Hi?", "Please describe every object you can see in this picture in great detail."]
    batch = chat_inputs(processor, prompts, family.sizes[:2])
    raw = model.encode_images(**vision_inputs(model, batch))
    vision = model.backbone.as_vision_features(raw)
    if family.variable:
        assert vision.lengths[0] != vision.lengths[1] and not torch.equal(vision.grids[0], vision.grids[1])
    together = model.guard(**batch)
    for i in range(2):
        alone = model.guard(**chat_inputs(processor, [prompts[i]], [family.sizes[i]], seed=i))
        assert (together.level_logits[i] - alone.level_logits[0]).abs().max().item() <= 1e-5
        assert (together.type_logits[i] - alone.type_logits[0]).abs().max().item() <= 1e-5
    # the projector reads each image's own features: cabstractor pools its own grid to M
    features, mask = model.safety_features(raw)
    if projector == "cabstractor":
        assert features.shape[1] == 4 and mask is None
    elif family.variable:
        assert mask is not None and mask.sum(1).tolist() == vision.lengths.tolist()
    else:  # every image all N features: nothing to mask
        assert mask is None and features.shape[1] == vision.shape[1]


# ---------------------------------------------------------------------------------- training
def _records(n: int, sizes, seed: int = 0):
    """Records whose prompt names the risk type and whose image has the type's colour, in
    images of several sizes (so batches mix layouts)."""
    from train_fixtures import TYPE_COLOURS, TYPE_WORDS

    from safevlm.data import SafetyRecord, Turn

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = int(rng.integers(0, len(TYPE_WORDS)))
        level = 0 if t == 6 else 1 + int(rng.integers(0, 3))
        buf = io.BytesIO()
        image(sizes[i % len(sizes)], seed * 10_007 + i, TYPE_COLOURS[t]).save(buf, format="PNG")
        answer = "The image shows a red circle." if t == 6 else "I am sorry, but I can't help with that request."
        turns = [Turn("user", f"{TYPE_WORDS[t]} request: what is shown in the image?"), Turn("assistant", answer)]
        out.append(SafetyRecord(id=f"r{seed}-{i}", image=buf.getvalue(), turns=turns, risk_level=level, risk_type=t,
                                source="test"))
    return out


def test_stage1_learns_and_stage2_lora_saves_and_loads(tmp_path, family):
    from train_fixtures import SAFETY_TEST_SIZES, tiny_config

    from safevlm.backbones import FAMILIES as BACKBONES
    from safevlm.loading import load_model_and_processor
    from safevlm.train import merge_lora, run_stage

    spec = f"tiny:{_preset(family)}"
    train, val = _records(56, family.sizes, seed=1), _records(21, family.sizes, seed=2)
    log = {"save_steps": 0, "plot": False, "progress_bar": False}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = tiny_config(tmp_path / "s1", model={"base": spec, "safety": SAFETY_TEST_SIZES},
                             optim={"epochs": 4, "lr": 3e-3}, log=log)  # cache on (tests/test_families_everywhere.py)
        s1 = run_stage(config, train_records=train, val_records=val)
        assert s1.cache["computed"] == len(train) + len(val)
        # 7 types: chance is 1/7; the prompt names the type
        assert s1.metrics["eval_type_accuracy"] >= 0.8, s1.metrics

        config = tiny_config(tmp_path / "s2", stage=2, model={"base": spec, "adapter": str(s1.adapter_dir)},
                             cache={"enabled": False}, optim={"epochs": 1}, log=log)
        s2 = run_stage(config, train_records=train[:16])
    finally:
        torch.set_num_threads(threads)
    lora = {n.rsplit(".lora_A", 1)[0] for n, _ in s2.model.named_parameters() if ".lora_A." in n}
    assert lora and all(".language_model." in n for n in lora)
    backbone = BACKBONES[family.name]
    assert {n.rsplit(".", 1)[-1] for n in lora} == set(backbone.lora_target_modules)  # LoRA targets, per family
    assert sorted(p.name for p in s2.adapter_dir.iterdir()) == ["lora", "safety_config.json", "safety_model.safetensors"]
    saved = json.loads((s2.adapter_dir / "safety_config.json").read_text())
    assert saved["base_model_type"] == family.name and saved["variable_image_features"] is family.variable
    reloaded, processor = load_model_and_processor(spec, s2.adapter_dir)
    inputs = chat_inputs(processor, ["illegal request: what is shown in the image?"], family.sizes[1:2])
    merged_dir = merge_lora(spec, s2.adapter_dir, tmp_path / "merged")
    merged = SafeVLM.from_pretrained(merged_dir, merged_dir / "safety_adapter")
    assert type(merged.base_model).__name__ == family.model_class and not hasattr(merged.base_model, "peft_config")
    with torch.no_grad():
        a, b, c = reloaded(**inputs), s2.model.eval()(**inputs), merged(**inputs)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.type_logits, b.type_logits)
    torch.testing.assert_close(c.logits, b.logits, atol=1e-5, rtol=1e-4)


def test_adapter_for_another_family_is_refused(tmp_path, tiny_family):
    from safevlm.loading import load_model_and_processor
    from safevlm.tiny import build_tiny

    family, base, _ = tiny_family
    SafeVLM(base, num_prefix_tokens=2, **SMALL).save_pretrained(tmp_path)
    others = ["test"] + [_preset(f) for f in FAMILIES if f.name != family.name]
    for other in others:
        with pytest.raises(ValueError, match=rf"was made for a {family.name} \({family.model_class}\) base, "
                                             r"but this base is \w+ \(\w+ForConditionalGeneration\)"):
            SafeVLM.from_pretrained(build_tiny(other)[0], tmp_path)
        with pytest.raises(ValueError, match="do not carry over between model families"):
            load_model_and_processor(f"tiny:{other}", tmp_path)


def test_published_parameter_count(family, capsys):
    assert main(["params", "--base", family.release, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["base_params"] == family.published_params
    if family.published_rounded:  # the exact count is not published: it must round to the figure that is
        assert f"{result['base_params'] / 1e9:.2f}B" == family.published_rounded
    assert result["safety_params"] == sum(result["modules"].values()) > 0
    for release, published in family.more_releases:
        assert main(["params", "--base", release, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["base_params"] == published, release


# ---------------------------------------------------------------------------------------- docs
VERIFIED = [  # (what, the test that shows it)
    ("tiny build: plain class + AutoProcessor, one loader", "test_tiny_build_loads_with_the_plain_class_and_auto_processor"),
    ("processor's image tokens = the model's layout", "test_processor_counts_match_the_models_layout"),
    ("transparency (no prefix tokens, multi-tile non-square image) <= 1e-5",
     "test_transparency_without_prefix_tokens_on_a_multi_tile_image"),
    ("KV-cache generate = no-cache greedy decode, with prefix tokens", "test_kv_cache_generation_matches_no_cache_greedy_decode"),
    ("one vision pass per forward / generate / guard; guard never runs the LLM",
     "test_vision_tower_runs_once_and_guard_never_calls_the_llm"),
    ("generate_guarded: one vision pass for a batch of image sizes", "test_generate_guarded_runs_with_one_vision_pass"),
    ("head padding-invariant, images of different sizes (mlp, cabstractor)",
     "test_head_is_padding_invariant_with_images_of_different_sizes"),
    ("stage 1 learns (type accuracy >= 0.8), stage 2 LoRA saves / loads / merges",
     "test_stage1_learns_and_stage2_lora_saves_and_loads"),
    ("adapter of another family refused", "test_adapter_for_another_family_is_refused"),
    ("published parameter count of the 7B-class release(s) (exact, or to the published rounding)",
     "test_published_parameter_count"),
]


def families_table() -> str:
    """docs/families.md's table: one column per family, one row per verified property (each
    row names the test that checks it on every family of :data:`FAMILIES`)."""
    import sys

    from safevlm.backbones import FAMILIES as BACKBONES
    from safevlm.tiny import preset_name

    module = sys.modules[__name__]
    head = "| | " + " | ".join(f.name for f in FAMILIES) + " |"
    lines = [head, "|" + "---|" * (len(FAMILIES) + 1)]
    lines.append("| transformers class | " + " | ".join(f"`{f.model_class}`" for f in FAMILIES) + " |")
    lines.append("| tiny spec | " + " | ".join(f"`tiny:{preset_name(f.name, 'test')}`" for f in FAMILIES) + " |")
    lines.append("| LoRA targets | " + " | ".join(
        ", ".join(BACKBONES[f.name].lora_target_modules) for f in FAMILIES) + " |")
    lines.append("| 7B-class release (`params --base`) | " + " | ".join(
        f"`{f.release}`: {f.published_params:,}" + (f" (published: {f.published_rounded})" if f.published_rounded else "")
        + "".join(f"; `{name}`: {count:,}" for name, count in f.more_releases)
        for f in FAMILIES) + " |")
    for what, test in VERIFIED:
        assert callable(getattr(module, test)), test
        lines.append(f"| {what} (`{test}`) | " + " | ".join("yes" for _ in FAMILIES) + " |")
    return "\n".join(lines) + "\n"


def test_docs_table_is_current():
    path = ROOT / "docs" / "families.md"
    text = path.read_text()
    begin, end = "<!-- families table: generated by tests/test_families.py -->\n", "<!-- end of table -->"
    table = families_table()
    if os.environ.get("SAFEVLM_WRITE_DOCS") == "1":  # SAFEVLM_WRITE_DOCS=1 pytest tests/test_families.py -k docs
        start, stop = text.index(begin) + len(begin), text.index(end)
        path.write_text(text[:start] + table + text[stop:])
        text = path.read_text()
    assert begin + table + end in text, "docs/families.md's table is stale: run SAFEVLM_WRITE_DOCS=1 pytest tests/test_families.py -k docs"
