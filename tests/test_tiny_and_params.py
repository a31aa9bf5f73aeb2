"""The embedded tiny default and full-scale parameter accounting."""

from __future__ import annotations

import json

import torch

from safevlm.cli import main


def test_tiny_build_saves_a_normal_hf_folder(tmp_path, capsys):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    assert main(["tiny", "build", "--out", str(tmp_path), "--preset", "test", "--seed", "3"]) == 0
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    from safevlm.tiny import build_tiny

    rebuilt, _ = build_tiny("test", seed=3)
    for (name, a), b in zip(rebuilt.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], add_generation_prompt=True
    )
    assert text == "USER: <image>\nHi ASSISTANT:"


def test_tokenizer_round_trips_text_and_keeps_image_token_whole(tiny_processor):
    tok = tiny_processor.tokenizer
    text = "USER: <image>\nWhat colour is the circle? ASSISTANT: It is red.</s>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 1
    assert tok.decode(ids) == text


def test_params_7b_matches_the_published_count(capsys):
    assert main(["params", "--base", "llava-1.5-7b", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["base_params"] == 7_063_427_072
    assert set(result) >= {"base_params", "safety_params", "ratio", "modules", "adapter_bytes_bf16"}


def test_params_ratio_is_what_the_modules_hold(capsys):
    from transformers import LlavaForConditionalGeneration

    from safevlm.accounting import llava_config
    from safevlm.model import SafeVLM

    assert main(["params", "--base", "llava-1.5-13b", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    config = llava_config("llava-1.5-13b")
    with torch.device("meta"):
        model = SafeVLM(LlavaForConditionalGeneration(config), num_prefix_tokens=64, num_query_tokens=64)
    modules = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in SafeVLM.SAFETY_MODULES}
    assert result["modules"] == modules
    assert result["safety_params"] == sum(modules.values())
    base = sum(p.numel() for p in model.base_model.parameters())
    assert result["base_params"] == base
    assert abs(result["ratio"] - sum(modules.values()) / base) < 1e-12
    # prefix tokens: 64 x 5120 (the 13B hidden size) + the head-state projection 1024 -> 5120
    assert modules["prefix_tokens"] == 64 * 5120 + 1024 * 5120 + 5120
    buffers = sum(b.numel() for name in SafeVLM.SAFETY_MODULES for b in getattr(model, name).buffers())
    assert result["adapter_bytes_bf16"] == 2 * (result["safety_params"] + buffers)


def test_every_command_has_help(capsys):
    import pytest

    from safevlm.cli import COMMAND_MODULES, build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert set(subparsers.choices) >= set(COMMAND_MODULES)
    for name in subparsers.choices:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: safevlm " + name in capsys.readouterr().out
