"""safevlm.loading: one loader (tiny spec, folder, adapter, LoRA), one dtype rule, adapters bound
to their exact base (fingerprint), shapes checked before LoRA, and quiet loading."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import make_image, make_inputs
from train_fixtures import SAFETY_TEST_SIZES

from safevlm.errors import UsageError
from safevlm.bases import (
    BaseMismatchError,
    base_fingerprint,
    folder_fingerprint,
    load_base,
    load_base_model,
    parse_tiny_spec,
    resolve_dtype,
    stored_dtype,
)
from safevlm.loading import load_model_and_processor
from safevlm.model import SafeVLM

PROMPTS = ["What is shown in the image?", "Describe it."]
LORA_TARGETS = r".*language_model.*\.(q_proj|v_proj)"


def _perturb(model, scale=0.1, seed=0):
    """Make safety weights non-trivial, so a missed load shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.safety_parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale)


def _lora_model(base):
    """A SafeVLM around ``base`` with a LoRA (non-zero deltas) on the LLM's q/v projections."""
    from peft import LoraConfig, get_peft_model

    from safevlm.compat import quiet_loading

    torch.manual_seed(0)
    with quiet_loading():
        peft = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))
    model = SafeVLM(peft, **SAFETY_TEST_SIZES).eval()
    _perturb(model)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Saved tiny bases at seeds 0 and 1, a safety adapter and a stage-2 (LoRA) adapter on seed 0."""
    from safevlm.tiny import save_tiny

    root = tmp_path_factory.mktemp("loading")
    save_tiny(root / "base0", preset="test", seed=0)
    save_tiny(root / "base1", preset="test", seed=1)
    base = load_base_model(root / "base0", device="cpu")  # (4.57's from_pretrained draws random numbers)
    torch.manual_seed(0)
    model = SafeVLM(base, **SAFETY_TEST_SIZES).eval()
    _perturb(model)
    model.save_pretrained(root / "adapter")
    _lora_model(load_base_model(root / "base0", device="cpu")).save_pretrained(root / "lora_adapter")
    make_image(3, size=40).save(root / "image.png")
    return root


def _run(command: str, argv: list[str]) -> int:
    module = importlib.import_module(f"safevlm.commands.{command}")
    parser = argparse.ArgumentParser()
    module.register(parser.add_subparsers())
    args = parser.parse_args([command, *argv])
    return args.func(args)


# -- the dtype rule ----------------------------------------------------------------------------------
def test_auto_dtype_is_float32_on_cpu_bfloat16_on_capable_gpus_else_float16(monkeypatch):
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype(None, "cpu") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda:1")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda:0") is torch.float16
    assert resolve_dtype("auto", "mps") is torch.float16
    # explicit names and dtypes win on every device
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    assert resolve_dtype("float32", "cuda") is torch.float32
    assert resolve_dtype(torch.float16, "cpu") is torch.float16
    with pytest.raises(UsageError, match="unknown dtype 'float99'; allowed: auto, float32, bfloat16, float16"):
        resolve_dtype("float99", "cpu")
    with pytest.raises(UsageError, match="unknown dtype torch.int8"):
        resolve_dtype(torch.int8, "cpu")


def test_tiny_spec_parsing():
    assert parse_tiny_spec("tiny:default") == ("default", 0)
    assert parse_tiny_spec("tiny:test@7") == ("test", 7)
    assert parse_tiny_spec("tiny:") is None and parse_tiny_spec("tiny:test@x") is None
    assert parse_tiny_spec("/models/llava") is None and parse_tiny_spec(None) is None


# -- bases ----------------------------------------------------------------------------------------------
def test_tiny_spec_loads_the_seeded_tiny_model_in_the_asked_dtype():
    from safevlm.tiny import build_tiny

    reference = build_tiny("test", seed=0)[0]
    model, processor = load_base("tiny:test", device="cpu")
    assert processor is not None and processor.tokenizer.chat_template
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    other, _ = load_base("tiny:test@1", device="cpu")
    assert not torch.equal(other.lm_head.weight, reference.lm_head.weight)
    half, _ = load_base("tiny:test", dtype="bfloat16", device="cpu")
    assert half.lm_head.weight.dtype is torch.bfloat16
    assert half.model.vision_tower.get_input_embeddings().weight.dtype is torch.bfloat16
    with pytest.raises(ValueError, match="unknown tiny preset 'huge'"):
        load_base("tiny:huge")


def test_folder_loads_the_same_weights_and_an_equivalent_processor(folders):
    from safevlm.tiny import build_tiny

    reference, built_processor = build_tiny("test", seed=0)
    model, processor = load_base(folders / "base0", device="cpu")
    assert model.lm_head.weight.dtype is torch.float32  # auto on CPU
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    image = make_image(1, size=30)
    torch.testing.assert_close(processor(images=image, text="<image>", return_tensors="pt")["pixel_values"],
                               built_processor(images=image, text="<image>", return_tensors="pt")["pixel_values"])
    # a processor from another folder, or an object, replaces the base's own
    assert load_base(folders / "base0", device="cpu", processor=built_processor)[1] is built_processor
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_model_and_processor(folders / "nothing")


def test_a_model_passed_in_is_cast_by_the_same_rule_and_stays_on_its_device():
    from safevlm.tiny import build_tiny

    base = build_tiny("test", seed=0)[0]
    assert load_base_model(base) is base and base.lm_head.weight.dtype is torch.float32  # auto, CPU: no change
    load_base_model(base, dtype="bfloat16")
    assert base.lm_head.weight.dtype is torch.bfloat16 and base.lm_head.weight.device.type == "cpu"


# -- adapters -------------------------------------------------------------------------------------------
def test_folder_and_adapter_give_the_saved_models_outputs(folders):
    from safevlm.tiny import build_tiny

    base, processor = build_tiny("test", seed=0)
    torch.manual_seed(0)
    reference = SafeVLM(base, **SAFETY_TEST_SIZES).eval()
    _perturb(reference)
    model, loaded_processor = load_model_and_processor(folders / "base0", folders / "adapter", device="cpu")
    assert not model.training and model.safety_head.level_classifier.weight.dtype is torch.float32
    inputs = make_inputs(processor, PROMPTS)
    with torch.no_grad():
        a, b = reference(**inputs), model(**inputs)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.level_logits, b.level_logits)
    assert loaded_processor.tokenizer("Describe it.")["input_ids"] == processor.tokenizer("Describe it.")["input_ids"]


def test_lora_adapter_loads_frozen_for_inference_and_trainable_for_training(folders):
    from safevlm.tiny import build_tiny

    reference = _lora_model(build_tiny("test", seed=0)[0])
    processor = build_tiny("test", seed=0)[1]
    model, _ = load_model_and_processor(folders / "base0", folders / "lora_adapter", device="cpu")
    lora = {n: p for n, p in model.base_model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert not any(p.requires_grad for p in lora.values())
    inputs = make_inputs(processor, PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits)
    trainable = SafeVLM.from_pretrained(load_base_model(folders / "base0"), folders / "lora_adapter", trainable=True)
    assert all(p.requires_grad for n, p in trainable.base_model.named_parameters() if "lora_" in n)
    assert trainable.safety_head.level_classifier.weight.dtype is torch.float32


def test_dtype_applies_to_the_base_and_the_safety_modules_follow(folders):
    model, _ = load_model_and_processor(folders / "base0", folders / "adapter", device="cpu", dtype="bfloat16")
    assert model.backbone.lm_head.weight.dtype is torch.bfloat16
    assert {p.dtype for p in model.safety_parameters()} == {torch.bfloat16}
    alias = SafeVLM.from_pretrained(folders / "base0", folders / "adapter", torch_dtype="bfloat16", device="cpu")
    assert alias.backbone.lm_head.weight.dtype is torch.bfloat16
    with pytest.raises(ValueError, match="disagree"):
        SafeVLM.from_pretrained(folders / "base0", dtype="float16", torch_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"config overrides \['num_prefix_tokens'\] cannot change"):
        load_model_and_processor(folders / "base0", folders / "adapter", num_prefix_tokens=2)
    with pytest.raises(FileNotFoundError, match="adapter folder not found"):
        load_model_and_processor(folders / "base0", folders / "no_adapter")


def test_no_adapter_builds_seeded_untrained_modules_with_a_warning(folders, caplog):
    with caplog.at_level(logging.WARNING, logger="safevlm.loading"):
        a, _ = load_model_and_processor("tiny:test", device="cpu", seed=3, **SAFETY_TEST_SIZES)
        b, _ = load_model_and_processor("tiny:test", device="cpu", seed=3, **SAFETY_TEST_SIZES)
    assert "untrained" in caplog.text
    assert a.config.num_prefix_tokens == 4
    for (name, x), y in zip(a.safety_state_dict().items(), b.safety_state_dict().values()):
        assert torch.equal(x, y), name


# -- fingerprint ----------------------------------------------------------------------------------------
def test_fingerprint_is_the_same_on_disk_in_memory_sharded_and_in_float32_or_bfloat16(folders, tmp_path):
    import copy

    from safevlm.tiny import build_tiny

    base = build_tiny("test", seed=0)[0]
    fp = base_fingerprint(base)
    assert fp.startswith("v1:") and len(fp) == 3 + 16
    assert folder_fingerprint(folders / "base0") == fp
    assert base_fingerprint(copy.deepcopy(base).to(torch.bfloat16)) == fp  # rounded to bf16 precision
    base.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert folder_fingerprint(tmp_path / "sharded") == fp
    # a float16 load rounds differently, but a loaded base keeps its checkpoint's fingerprint
    assert base_fingerprint(copy.deepcopy(base).to(torch.float16)) != fp
    assert base_fingerprint(load_base_model(folders / "base0", dtype="float16", device="cpu")) == fp
    assert base_fingerprint(load_base_model("tiny:test", dtype="float16", device="cpu")) == fp
    # other weights, other fingerprint; and a loaded base that is then changed is not its checkpoint
    assert folder_fingerprint(folders / "base1") != fp
    changed = load_base_model(folders / "base0", dtype="float16", device="cpu")
    with torch.no_grad():
        changed.get_input_embeddings().weight.add_(0.5)
    assert base_fingerprint(changed) != fp


def test_saved_adapter_records_its_base_fingerprint(folders):
    saved = json.loads((folders / "adapter" / "safety_config.json").read_text())
    assert saved["base_fingerprint"] == folder_fingerprint(folders / "base0")
    lora_saved = json.loads((folders / "lora_adapter" / "safety_config.json").read_text())
    assert lora_saved["base_fingerprint"] == saved["base_fingerprint"]  # LoRA never touches the sampled tensors


def test_adapter_on_a_base_with_other_weights_is_refused_before_the_weights_load(folders, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    expected = folder_fingerprint(folders / "base0")
    other = folder_fingerprint(folders / "base1")
    for base in (folders / "base1", "tiny:test@1"):
        with pytest.raises(BaseMismatchError) as info:
            load_model_and_processor(base, folders / "adapter", device="cpu")
        message = str(info.value)
        assert expected in message and other in message and str(folders / "adapter") in message
        assert "allow_base_mismatch" in message and "--allow-base-mismatch" in message
    with pytest.raises(BaseMismatchError):
        SafeVLM.from_pretrained("tiny:test@1", folders / "adapter")

    def never(*args, **kwargs):
        raise AssertionError("the base weights were loaded before the fingerprint check")

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", never)
    with pytest.raises(BaseMismatchError):
        load_model_and_processor(folders / "base1", folders / "lora_adapter", device="cpu")


def test_allow_base_mismatch_loads_with_a_warning_and_the_cli_flags(folders, caplog, capsys):
    with caplog.at_level(logging.WARNING, logger="safevlm.loading"):
        model, _ = load_model_and_processor(folders / "base1", folders / "adapter", allow_base_mismatch=True)
    assert "loading it anyway" in caplog.text and folder_fingerprint(folders / "base1") in caplog.text
    assert model.config.base_fingerprint == folder_fingerprint(folders / "base0")
    common = ["--model", str(folders / "base1"), "--adapter", str(folders / "adapter"),
              "--image", str(folders / "image.png"), "--json"]
    with pytest.raises(BaseMismatchError):
        _run("classify", common)
    assert _run("classify", [*common, "--allow-base-mismatch"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["action"] in ("allow", "hint", "refuse")


def test_serve_settings_carry_allow_base_mismatch(folders):
    pytest.importorskip("pydantic_settings")
    from safevlm.serve.engine import Engine
    from safevlm.serve.settings import ServerSettings, add_settings_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    args = parser.parse_args(["--model", str(folders / "base1"), "--adapter", str(folders / "adapter"),
                              "--allow-base-mismatch"])
    settings = settings_from_args(args)
    assert settings.allow_base_mismatch is True
    engine = Engine.from_settings(settings)
    assert engine.model.config.base_fingerprint == folder_fingerprint(folders / "base0")
    with pytest.raises(BaseMismatchError):
        Engine.from_settings(ServerSettings(model=str(folders / "base1"), adapter=str(folders / "adapter")))


def test_adapters_saved_before_fingerprints_load_with_a_warning(folders, tmp_path, caplog):
    import shutil

    legacy = tmp_path / "legacy"
    shutil.copytree(folders / "adapter", legacy)
    config = json.loads((legacy / "safety_config.json").read_text())
    del config["base_fingerprint"]
    (legacy / "safety_config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="safevlm.loading"):
        model, _ = load_model_and_processor(folders / "base1", legacy, device="cpu")
    assert f"adapter {legacy} has no base fingerprint (saved before safevlm recorded them" in caplog.text
    assert "cannot check that it was trained on this base" in caplog.text
    assert model.config.base_fingerprint is None


def test_train_recipe_key_allows_a_base_mismatch(folders, tmp_path):
    from train_fixtures import tiny_config

    from safevlm.train.stage import build_model, load_base as train_load_base

    config = tiny_config(tmp_path, stage=1, model={"base": "tiny:test@1", "adapter": str(folders / "adapter")})
    base, processor = train_load_base(config)
    assert processor is not None and base.lm_head.weight.device.type == "cpu"
    with pytest.raises(BaseMismatchError, match="recipe key model.allow_base_mismatch"):
        build_model(config, base)
    allowed = tiny_config(tmp_path, stage=1, model={"base": "tiny:test@1", "adapter": str(folders / "adapter"),
                                                     "allow_base_mismatch": True})
    model = build_model(allowed, base)
    assert all(p.dtype is torch.float32 for p in model.safety_parameters())


def test_merge_checks_the_base_and_binds_the_merged_folder(folders, tmp_path, caplog):
    from safevlm.train.merge import merge_lora

    with pytest.raises(BaseMismatchError):
        merge_lora(folders / "base1", folders / "lora_adapter", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert stored_dtype(folders / "base0") is torch.float32 and stored_dtype("tiny:test") is torch.float32
    out = merge_lora(folders / "base0", folders / "lora_adapter", tmp_path / "merged", dtype="float16")
    assert stored_dtype(out) is torch.float16
    saved = json.loads((out / "safety_adapter" / "safety_config.json").read_text())
    assert saved["base_fingerprint"] == folder_fingerprint(out) != folder_fingerprint(folders / "base0")
    with caplog.at_level(logging.WARNING, logger="safevlm.loading"):
        load_model_and_processor(out, out / "safety_adapter", device="cpu", dtype="float32")
    assert caplog.text == ""
    assert _run("merge", ["--base", str(folders / "base1"), "--adapter", str(folders / "lora_adapter"),
                          "--out", str(tmp_path / "forced"), "--allow-base-mismatch"]) == 0
    assert "loading it anyway" in caplog.text


# -- shapes before LoRA, and quiet loading ---------------------------------------------------------------
def test_stage2_adapter_on_a_base_of_another_shape_fails_before_peft_loads(folders, tmp_path, capfd, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    import safevlm.bases as bases
    from safevlm.tiny import build_config, build_processor

    config = build_config("test", build_processor("test").tokenizer)
    config.text_config.hidden_size = 48
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path / "wide")
    build_processor("test").save_pretrained(tmp_path / "wide")
    capfd.readouterr()
    for base in (tmp_path / "wide", load_base_model(tmp_path / "wide")):
        with pytest.raises(ValueError, match="text_hidden_size: 32 here vs 48 in the base"):
            load_model_and_processor(base, folders / "lora_adapter", device="cpu")
    err = capfd.readouterr().err
    assert "size mismatch" not in err and err == ""
    # the LoRA is never read: the check comes first
    monkeypatch.setattr(bases, "load_lora", lambda *a, **k: pytest.fail("LoRA loaded before the shape check"))
    with pytest.raises(ValueError, match="another shape"):
        SafeVLM.from_pretrained(load_base_model(tmp_path / "wide"), folders / "lora_adapter")


def test_loading_a_saved_folder_and_lora_adapter_prints_nothing(folders):
    """In a fresh process (once-only notices included): no warning, no progress bar, nothing on stderr."""
    script = textwrap.dedent(f"""
        import warnings
        warnings.simplefilter("always")
        from safevlm.loading import load_model_and_processor
        model, processor = load_model_and_processor({str(folders / "base0")!r}, {str(folders / "lora_adapter")!r},
                                                    device="cpu")
        model.save_pretrained({str(folders / "resaved")!r})
        print("loaded", type(processor.image_processor).__name__)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("loaded CLIPImageProcessor")
    assert done.stderr == ""


def test_loading_in_process_raises_no_warnings(folders, capfd):
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model_and_processor(folders / "base0", folders / "lora_adapter", device="cpu")
        load_model_and_processor("tiny:test", folders / "adapter", device="cpu", dtype="bfloat16")
    assert [str(w.message) for w in caught] == []
    assert capfd.readouterr().err == ""
