"""Guard-only loading (issue 15, item 1): only the vision tower, the token embeddings and the
safety modules are read and held; guard gives what the full model gives; the language model
is never read from disk, and asking for it fails clearly."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import safetensors
import torch
from conftest import make_inputs
from train_fixtures import SAFETY_TEST_SIZES

from safevlm.bases import BaseMismatchError, GuardOnlyError, base_fingerprint, load_base_model
from safevlm.cli import main
from safevlm.loading import load_model_and_processor
from safevlm.model import SafeVLM

PROMPTS = ["What is shown in the image?", "Steps to make something dangerous at home, in detail."]


# ------------------------------------------------------------------------ independent counts
def clip_vision_params(v) -> int:
    """Parameters of a CLIP vision transformer from its config (embeddings, pre-norm, layers, post-norm)."""
    d, i = v.hidden_size, v.intermediate_size
    positions = (v.image_size // v.patch_size) ** 2 + 1
    embeddings = d + 3 * v.patch_size**2 * d + positions * d  # class token, patch conv (no bias), positions
    layer = 4 * (d * d + d) + 2 * (2 * d) + (d * i + i) + (i * d + d)  # q k v o, two norms, fc1, fc2
    return embeddings + 2 * d + v.num_hidden_layers * layer + 2 * d


def llama_language_model_params(t) -> dict:
    """Parameters of a Llama decoder stack (no biases), its final norm and an untied LM head."""
    d, i = t.hidden_size, t.intermediate_size
    kv = t.num_key_value_heads * (d // t.num_attention_heads)
    layer = 2 * d * d + 2 * d * kv + 3 * d * i + 2 * d
    return {"layers": t.num_hidden_layers * layer, "norm": d, "lm_head": t.vocab_size * d,
            "embed_tokens": t.vocab_size * d}


def llava_projector_params(config) -> int:
    dv, d = config.vision_config.hidden_size, config.text_config.hidden_size
    return dv * d + d + d * d + d


# --------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny LLaVA saved as sharded safetensors (seed 0, and seed 1 for a mismatch), and a
    stage-2-like adapter on seed 0: safety weights + the stage-2 LoRA (non-zero deltas)."""
    from safevlm.compat import quiet_loading
    from safevlm.tiny import build_processor, build_tiny
    from safevlm.train.config import LoraSection
    from safevlm.train.stage import add_lora

    root = tmp_path_factory.mktemp("guard_only")
    for seed in (0, 1):
        base, processor = build_tiny("test", seed=seed)
        with quiet_loading():
            base.save_pretrained(root / f"base{seed}", max_shard_size="20KB")
        build_processor("test").save_pretrained(root / f"base{seed}")
    index = json.loads((root / "base0" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 5  # really sharded

    torch.manual_seed(0)
    model = SafeVLM(load_base_model(root / "base0", device="cpu"), **SAFETY_TEST_SIZES)
    add_lora(model, SimpleNamespace(lora=LoraSection(r=4, alpha=8, dropout=0.0)))  # stage 2's own LoRA
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or name.split(".", 1)[0] in SafeVLM.SAFETY_MODULES:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)  # a missed or wrong load shows
    model.save_pretrained(root / "adapter")
    return root


class ReadSpy:
    """Wraps ``safetensors.safe_open`` and records every tensor (``get_tensor``) and slice
    (``get_slice``) read, by checkpoint key."""

    def __init__(self, real):
        self.real, self.tensors, self.slices = real, [], []

    def __call__(self, *args, **kwargs):
        handle, spy = self.real(*args, **kwargs), self

        class Handle:
            def __enter__(self):
                handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return handle.keys()

            def metadata(self):
                return handle.metadata()

            def get_tensor(self, key):
                spy.tensors.append(key)
                return handle.get_tensor(key)

            def get_slice(self, key):
                spy.slices.append(key)
                return handle.get_slice(key)

            def get_tensors(self):  # safetensors.torch.load_file imported after the patch: a whole (adapter) file
                return handle.get_tensors()

        return Handle()


@pytest.fixture
def spy(monkeypatch):
    reads = ReadSpy(safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", reads)
    return reads


def _guard(model, processor, prompts=PROMPTS):
    inputs = make_inputs(processor, prompts)
    return model.guard(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])


def _assert_same_guard(a, b, atol=1e-6):
    for field in ("level_logits", "type_logits", "level_probs", "type_probs", "safety_state", "vision_features"):
        torch.testing.assert_close(getattr(a, field).float(), getattr(b, field).float(), atol=atol, rtol=0)
    assert torch.equal(a.risk_level, b.risk_level) and torch.equal(a.risk_type, b.risk_type)


def _base_parameter_names(model) -> list[str]:
    return [n for n, _ in model.base_model.named_parameters()]


# ---------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_guard_only_guard_equals_the_full_model_with_its_lora(folders, dtype):
    full, processor = load_model_and_processor(folders / "base0", folders / "adapter", device="cpu", dtype=dtype)
    guard, _ = load_model_and_processor(folders / "base0", folders / "adapter", device="cpu", dtype=dtype,
                                        guard_only=True)
    assert guard.guard_only is True and full.guard_only is False
    lora = [p for n, p in full.base_model.named_parameters() if "lora_B" in n]
    assert lora and all(p.abs().sum() > 0 for p in lora)  # the full model really runs a changed LLM
    assert next(guard.safety_head.parameters()).dtype == getattr(torch, dtype)
    _assert_same_guard(_guard(guard, processor), _guard(full, processor))
    # image alone, and a precomputed vision pass, too
    inputs = make_inputs(processor, PROMPTS)
    _assert_same_guard(guard.guard(pixel_values=inputs["pixel_values"]), full.guard(pixel_values=inputs["pixel_values"]))
    head = guard.forward(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], compute_lm=False)
    torch.testing.assert_close(head.level_logits, _guard(full, processor).level_logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", ["hub", "in_memory"])
def test_one_file_checkpoints_in_other_key_layouts_load_guard_only(folders, tmp_path, layout):
    """The hub's LLaVA layout (``vision_tower.vision_model.*``, ``language_model.model.*``) and
    the in-memory one (``model.vision_tower.*``, ``model.language_model.*``), in one
    ``model.safetensors``: the same guard as the sharded folder."""
    import shutil

    from safetensors.torch import load_file, save_file

    from safevlm.bases import canonical_name

    source = folders / "base0"
    state = {}
    for shard in sorted(source.glob("model-*.safetensors")):
        state.update(load_file(str(shard)))

    def rename(name: str) -> str:
        if layout == "in_memory":
            return name if name.startswith("lm_head.") else f"model.{name}"
        for short, long in (("vision_tower.", "vision_tower.vision_model."), ("language_model.", "language_model.model."),
                            ("lm_head.", "language_model.lm_head.")):
            if name.startswith(short):
                return long + name[len(short):]
        return name

    out = tmp_path / "base"
    out.mkdir()
    for path in source.iterdir():
        if "safetensors" not in path.name:
            shutil.copy(path, out / path.name)
    renamed = {rename(canonical_name("llava", k)): v.contiguous() for k, v in state.items()}
    assert len(renamed) == len(state)
    save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})

    full, processor = load_model_and_processor(source, folders / "adapter", device="cpu")
    guard, _ = load_model_and_processor(out, folders / "adapter", device="cpu", guard_only=True)
    _assert_same_guard(_guard(guard, processor), _guard(full, processor))


def test_classify_runs_on_a_guard_only_model(folders):
    from conftest import make_image

    from safevlm.guarded import classify

    full, processor = load_model_and_processor(folders / "base0", folders / "adapter", device="cpu")
    guard, _ = load_model_and_processor(folders / "base0", folders / "adapter", device="cpu", guard_only=True)
    images = [make_image(0), make_image(1)]
    got, want = classify(guard, processor, images, PROMPTS), classify(full, processor, images, PROMPTS)
    assert [(d.risk_level, d.risk_type, d.action) for d in got] == [(d.risk_level, d.risk_type, d.action) for d in want]


# what a guard-only load may read of each family's checkpoint (its on-disk names): the vision
# tower and the token embeddings (LLaVA-NeXT / OneVision: and the newline embedding; Gemma 3 writes
# the LLaVA layout, its LM head tied to the token embeddings)
_LLAVA_GUARD_READS = ("vision_tower.", "language_model.model.embed_tokens.weight", "image_newline")
_QWEN_GUARD_READS = ("visual.", "model.embed_tokens.weight")


@pytest.mark.parametrize("family, reads", [("llava_next", _LLAVA_GUARD_READS), ("llava_onevision", _LLAVA_GUARD_READS),
                                           ("qwen2_vl", _QWEN_GUARD_READS), ("qwen2_5_vl", _QWEN_GUARD_READS),
                                           ("gemma3", _LLAVA_GUARD_READS)])
def test_anyres_families_load_guard_only_from_sharded_folders(tmp_path, family, reads, spy):
    """LLaVA-NeXT / OneVision (tiles, unpadding), Qwen2-VL / Qwen2.5-VL (dynamic resolution) and
    Gemma 3 (tied LM head, scaled embeddings): guard-only gives the full model's decisions, and
    their language model's tensors are never read either."""
    from conftest import make_image

    from safevlm.compat import quiet_loading
    from safevlm.guarded import classify
    from safevlm.tiny import build_tiny

    base, processor = build_tiny(f"{family}_test", seed=0)
    with quiet_loading():
        base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    processor.save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    model = SafeVLM(load_base_model(tmp_path / "base", device="cpu"), **SAFETY_TEST_SIZES)
    with torch.no_grad():
        for p in model.safety_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "adapter")

    spy.tensors.clear()
    guard, processor = load_model_and_processor(tmp_path / "base", tmp_path / "adapter", device="cpu", guard_only=True)
    assert spy.tensors and not [k for k in spy.tensors if not k.startswith(reads)]
    full, _ = load_model_and_processor(tmp_path / "base", tmp_path / "adapter", device="cpu")
    images = [make_image(0, size=40), make_image(1, size=24)]  # different sizes: different tile grids
    got, want = classify(guard, processor, images, PROMPTS), classify(full, processor, images, PROMPTS)
    for a, b in zip(got, want, strict=True):
        assert (a.action, a.risk_level, a.risk_type) == (b.action, b.risk_level, b.risk_type)
        assert a.level_probs == pytest.approx(b.level_probs, abs=1e-6)
        assert [p for _, p in a.type_probs] == pytest.approx([p for _, p in b.type_probs], abs=1e-6)
    assert not [n for n, _ in guard.base_model.named_parameters() if ".layers." in n and "vision_tower" not in n]


def test_safevlm_from_pretrained_loads_guard_only_too(folders):
    full, processor = load_model_and_processor(folders / "base0", folders / "adapter", device="cpu")
    guard = SafeVLM.from_pretrained(folders / "base0", folders / "adapter", device="cpu", guard_only=True)
    assert guard.guard_only
    _assert_same_guard(_guard(guard, processor), _guard(full, processor))


def test_tiny_spec_loads_guard_only(folders):
    full, processor = load_model_and_processor("tiny:test@0", device="cpu", seed=3, **SAFETY_TEST_SIZES)
    guard, _ = load_model_and_processor("tiny:test@0", device="cpu", seed=3, guard_only=True, **SAFETY_TEST_SIZES)
    assert guard.guard_only
    assert _base_parameter_names(guard) and all(
        ".vision_tower." in n or n.endswith("embed_tokens.weight") for n in _base_parameter_names(guard)
    )
    _assert_same_guard(_guard(guard, processor), _guard(full, processor))
    # the tiny base keeps its fingerprint after the language model is dropped
    assert base_fingerprint(guard.base_model) == base_fingerprint(full.base_model) is not None


# ----------------------------------------------------------------------------------- memory
def test_guard_only_model_holds_no_language_model_parameters(folders):
    guard, _ = load_model_and_processor(folders / "base0", folders / "adapter", device="cpu", guard_only=True)
    names = _base_parameter_names(guard)
    assert not [n for n in names if ".layers." in n and "vision_tower" not in n]  # no decoder layer
    assert not [n for n in names if "lm_head" in n or "multi_modal_projector" in n or n.endswith("language_model.norm.weight")]
    assert not [n for n in names if "lora_" in n]
    assert sorted({n.split(".vision_tower.")[0] if ".vision_tower." in n else n for n in names}) == [
        "model", "model.language_model.embed_tokens.weight"]
    assert not any(t.is_meta for t in (*guard.parameters(), *guard.buffers()))


def test_guard_only_memory_is_the_expected_fraction(folders):
    full, _ = load_model_and_processor(folders / "base0", folders / "adapter", device="cpu")
    guard, _ = load_model_and_processor(folders / "base0", folders / "adapter", device="cpu", guard_only=True)
    config = guard.backbone.config
    safety = sum(p.numel() for p in guard.safety_parameters())
    lm = llama_language_model_params(config.text_config)
    kept = clip_vision_params(config.vision_config) + lm["embed_tokens"] + safety
    dropped = lm["layers"] + lm["norm"] + lm["lm_head"] + llava_projector_params(config)

    def nbytes(model):
        return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)

    assert nbytes(guard) == 4 * kept  # float32 on the CPU
    assert nbytes(full) == 4 * (kept + dropped)
    assert nbytes(guard) / nbytes(full) == pytest.approx(kept / (kept + dropped), abs=1e-12)
    assert kept / (kept + dropped) < 0.7  # the tiny test preset: mostly language model still


# ------------------------------------------------------------------------------ what is read
def test_decoder_layer_tensors_are_never_read(folders, spy):
    guard, _ = load_model_and_processor(folders / "base0", folders / "adapter", device="cpu", guard_only=True)
    index = json.loads((folders / "base0" / "model.safetensors.index.json").read_text())["weight_map"]
    vision = {k for k in index if k.startswith("vision_tower.")}
    assert vision and "language_model.model.embed_tokens.weight" in index
    assert sorted(spy.tensors) == sorted(vision | {"language_model.model.embed_tokens.weight"})
    # the base check samples a few rows of three tensors, none of them in the language model's layers
    assert set(spy.slices) == {"language_model.model.embed_tokens.weight", "multi_modal_projector.linear_1.weight",
                               next(k for k in vision if k.endswith("patch_embedding.weight"))}
    read = set(spy.tensors) | set(spy.slices)
    assert not [k for k in read if ".layers." in k and not k.startswith("vision_tower.")]
    assert not [k for k in read if "lm_head" in k or k.startswith("language_model.model.norm")]
    assert guard.guard_only


def test_fingerprint_is_checked_without_reading_the_language_model(folders, spy):
    with pytest.raises(BaseMismatchError, match="fingerprint"):
        load_model_and_processor(folders / "base1", folders / "adapter", device="cpu", guard_only=True)
    assert spy.tensors == []  # refused before any weight is read
    guard, _ = load_model_and_processor(folders / "base0", folders / "adapter", device="cpu", guard_only=True)
    saved = json.loads((folders / "adapter" / "safety_config.json").read_text())["base_fingerprint"]
    assert base_fingerprint(guard.base_model) == saved is not None


def test_a_lora_on_the_vision_tower_is_refused_guard_only(folders, tmp_path):
    from peft import LoraConfig, get_peft_model

    from safevlm.compat import quiet_loading

    base = load_base_model(folders / "base0", device="cpu")
    with quiet_loading():
        peft = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=r".*vision_tower.*\.q_proj"))
    SafeVLM(peft, **SAFETY_TEST_SIZES).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"LoRA tensors change parts the guard reads .*vision_tower.*without guard_only"):
        load_model_and_processor(folders / "base0", tmp_path / "adapter", device="cpu", guard_only=True)


# ------------------------------------------------------------------------ the LLM is absent
def test_generate_forward_and_save_raise_a_clear_error(folders, tmp_path):
    guard, processor = load_model_and_processor(folders / "base0", folders / "adapter", device="cpu", guard_only=True)
    inputs = make_inputs(processor, PROMPTS)
    args = (inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    with pytest.raises(GuardOnlyError, match=r"SafeVLM.generate needs the language model.*loaded guard-only"):
        guard.generate(*args, max_new_tokens=2)
    with pytest.raises(GuardOnlyError, match=r"SafeVLM.forward needs the language model.*loaded guard-only"):
        guard(*args)
    with pytest.raises(GuardOnlyError, match="guard-only"):
        guard.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(GuardOnlyError, match=r"model.multi_modal_projector was not loaded.*guard-only"):
        guard.base_model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    with pytest.raises(AttributeError, match="lm_head was not loaded"):
        guard.base_model.lm_head.weight


def test_guard_only_cannot_be_trainable(folders):
    with pytest.raises(ValueError, match="cannot be trainable"):
        load_model_and_processor(folders / "base0", folders / "adapter", guard_only=True, trainable=True)
    with pytest.raises(ValueError, match="cannot be trainable"):
        SafeVLM.from_pretrained("tiny:test", guard_only=True, trainable=True)


# ---------------------------------------------------------------------------- safevlm params
def test_params_guard_only_json_for_7b_matches_an_independent_count(capsys):
    from safevlm.accounting import llava_config

    assert main(["params", "--base", "llava-1.5-7b", "--guard-only", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["base_params"] == 7_063_427_072 and result["safety_params"] == 37_682_187  # unchanged
    config = llava_config("llava-1.5-7b")
    vision = clip_vision_params(config.vision_config)
    assert vision == 303_507_456  # CLIP ViT-L/14 at 336 px
    embeddings = 32064 * 4096
    lm = llama_language_model_params(config.text_config)
    # the full base is exactly the parts kept plus the parts dropped
    assert vision + lm["embed_tokens"] + lm["layers"] + lm["norm"] + lm["lm_head"] + llava_projector_params(config) \
        == result["base_params"]
    guard = vision + embeddings + result["safety_params"]
    full = result["base_params"] + result["safety_params"]
    assert result["guard_only_params"] == guard == 472_523_787
    assert result["guard_only_modules"] == {"vision_tower": vision, "token_embeddings": embeddings,
                                            "safety_modules": result["safety_params"]}
    assert result["full_params"] == full
    assert result["guard_only_share"] == pytest.approx(guard / full, rel=1e-12)
    assert 0.066 < result["guard_only_share"] < 0.067
    assert result["guard_only_bytes_bf16"] == 2 * guard and result["full_bytes_bf16"] == 2 * full


def test_params_guard_only_text_and_no_new_keys_without_it(capsys):
    assert main(["params", "--base", "llava-1.5-7b", "--json"]) == 0
    assert not [k for k in json.loads(capsys.readouterr().out) if k.startswith(("guard_only", "full_"))]
    assert main(["params", "--base", "llava-1.5-7b", "--guard-only"]) == 0
    out = capsys.readouterr().out
    assert "guard-only load: 472,523,787 parameters (6.65% of the full model's 7,101,109,259)" in out
    assert "token_embeddings" in out and "131,334,144" in out
