"""Training without prefix safety tokens (``model.safety.num_prefix_tokens=0``: hint + LoRA only),
the recipe for the guard proxy, whose remote engine cannot insert learned prefix tokens; and
the stage-2 LoRA exported for vLLM (``safevlm merge --lora-only``).

On the tiny 'test' model: stage 1 and stage 2 train and save, the adapter reloads to the same
guard outputs and answers, the language model then reads exactly what the plain base (with the
LoRA merged) reads — so an engine serving base + LoRA gives the in-process answer, hinted or
not — and the exported LoRA's tensors, under vLLM's names, rebuild the merged weights.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import make_image
from safetensors import safe_open
from train_fixtures import keyword_records, one_thread, tiny_config  # noqa: F401 (fixture)

from safevlm.bases import load_base
from safevlm.guarded import classify, generate_guarded, insert_hint
from safevlm.model import SafeVLM
from safevlm.policy import Policy
from safevlm.tiny import build_tiny
from safevlm.train import run_stage
from safevlm.train.merge import export_lora, merge_lora

pytestmark = pytest.mark.usefixtures("one_thread")
NO_PREFIX = {"num_prefix_tokens": 0, "num_query_tokens": 4, "head_num_heads": 4}
LLAMA_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def forcing_policy(action: str) -> Policy:
    rule = {"hint_threshold": None, "refuse_threshold": None}
    if action == "hint":
        rule.update(hint_threshold=1e-9, hint_level=1)
    hints = {"low": "Careful: low.", "medium": "Careful: medium.", "high": "Careful: high, answer safely."}
    return Policy.from_dict({"name": f"{action}_all", "rules": {"default": rule}, "hints": {"default": hints},
                             "refusals": {"default": "No."}})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Stage 1 (head only, no LM loss) then stage 2 (LoRA + LM loss, safety modules training),
    both with 0 prefix tokens."""
    tmp = tmp_path_factory.mktemp("noprefix")
    train, val = keyword_records(32, seed=0), keyword_records(8, seed=1, prefix="v")
    s1 = run_stage(tiny_config(tmp, stage=1, model={"safety": NO_PREFIX}, optim={"epochs": 2},
                               log={"save_steps": 0, "plot": False}), train_records=train, val_records=val)
    s2 = run_stage(tiny_config(tmp, stage=2, model={"adapter": str(s1.adapter_dir), "safety_modules": "train"},
                               optim={"epochs": 1}, log={"save_steps": 0, "plot": False}),
                   train_records=train, val_records=val)
    return s1, s2, tmp


def _reloaded(adapter_dir):
    base, processor = build_tiny("test", seed=0)
    return SafeVLM.from_pretrained(base, adapter_dir).eval(), processor


PROMPTS = ["What is shown in the image?", "illegal request: what is shown in the image?"]
IMAGES = [make_image(0), make_image(1)]


def test_both_stages_train_and_save_without_prefix_tokens(trained):
    s1, s2, _ = trained
    for result in (s1, s2):
        config = json.loads((result.adapter_dir / "safety_config.json").read_text())
        assert config["num_prefix_tokens"] == 0
        with safe_open(str(result.adapter_dir / "safety_model.safetensors"), "pt") as f:
            prefix = {k: tuple(f.get_tensor(k).shape) for k in f.keys() if k.startswith("prefix_tokens.")}
        assert prefix == {"prefix_tokens.embeddings": (0, 32)}  # an empty table, no conditioning layer
        assert result.model.prefix_tokens.condition is None
    assert (s2.adapter_dir / "lora" / "adapter_model.safetensors").is_file()
    assert s1.metrics["eval_loss"] > 0 and s2.metrics["eval_loss"] > 0
    # stage 2 moved the safety modules it was asked to train
    before = _reloaded(s1.adapter_dir)[0].safety_state_dict()
    after = s2.model.safety_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].numel())


def test_the_adapter_reloads_to_the_same_guard_and_answers(trained):
    _, s2, _ = trained
    trained_model = s2.model.eval()
    reloaded, processor = _reloaded(s2.adapter_dir)
    policy = forcing_policy("allow")
    with torch.no_grad():
        a = classify(trained_model, processor, IMAGES, PROMPTS, policy)
        b = classify(reloaded, processor, IMAGES, PROMPTS, policy)
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.tensor(x.level_probs), torch.tensor(y.level_probs), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.tensor([p for _, p in x.type_probs]),
                                   torch.tensor([p for _, p in y.type_probs]), atol=1e-6, rtol=0)
    gen = {"max_new_tokens": 8, "do_sample": False}
    first = generate_guarded(trained_model, processor, IMAGES, PROMPTS, policy, **gen)
    second = generate_guarded(reloaded, processor, IMAGES, PROMPTS, policy, **gen)
    assert [r.text for r in first] == [r.text for r in second] and all(r.completion_tokens for r in first)


@pytest.mark.parametrize("action", ["allow", "hint"])
def test_the_llm_reads_what_the_merged_base_reads(trained, action):
    """With no prefix tokens, guarded generation is plain generation of the base with the LoRA
    merged, on the (hinted) conversation: what an engine serving base + LoRA answers."""
    _, s2, tmp = trained
    merged_dir = tmp / "merged"
    if not merged_dir.exists():
        merge_lora("tiny:test", s2.adapter_dir, merged_dir)
    merged, processor = load_base(merged_dir, dtype="float32", device="cpu")
    model, _ = _reloaded(s2.adapter_dir)
    policy = forcing_policy(action)
    gen = {"max_new_tokens": 10, "do_sample": False}
    for image, prompt in zip(IMAGES, PROMPTS):
        result = generate_guarded(model, processor, [image], [prompt], policy, **gen)[0]
        assert result.action == action
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        if action == "hint":
            messages = insert_hint(messages, result.hint, policy.hint_position)
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=image, text=text, return_tensors="pt")
        with torch.no_grad():
            out = merged.generate(**inputs, **gen, pad_token_id=processor.tokenizer.pad_token_id)
        plain = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert result.text and result.text == plain
        assert result.prompt_tokens == inputs["input_ids"].shape[1]


# -- the LoRA for vLLM ------------------------------------------------------------------------------------------
def _weights(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_the_exported_lora_has_vllms_names_and_rebuilds_the_merged_weights(trained):
    _, s2, tmp = trained
    out = export_lora("tiny:test", s2.adapter_dir, tmp / "vllm-lora")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "safevlm_merge.json"]
    source = json.loads((s2.adapter_dir / "lora" / "adapter_config.json").read_text())
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (source["r"], source["lora_alpha"],
                                                                                LLAMA_LINEAR)
    assert config["peft_type"] == "LORA" and config["bias"] == "none" and not config["use_dora"]
    exported = _weights(out / "adapter_model.safetensors")
    original = _weights(s2.adapter_dir / "lora" / "adapter_model.safetensors")
    assert len(exported) == len(original) == 2 * 7 * 2  # A and B, 7 linear layers, 2 decoder layers
    assert all(k.startswith("base_model.model.language_model.model.layers.") for k in exported)
    # vLLM's name -> the HF module: undo hf_to_vllm_mapper ("model.language_model." -> "language_model.model.")
    base, _ = build_tiny("test", seed=0)
    merged_dir = tmp / "merged"
    if not merged_dir.exists():
        merge_lora("tiny:test", s2.adapter_dir, merged_dir)
    merged = load_base(merged_dir, dtype="float32", device="cpu")[0].state_dict()
    scale = config["lora_alpha"] / config["r"]
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in exported})
    assert len(modules) == 14
    for module in modules:
        hf_name = "model.language_model." + module.removeprefix("base_model.model.language_model.model.")
        a, b = exported[f"{module}.lora_A.weight"], exported[f"{module}.lora_B.weight"]
        rebuilt = base.state_dict()[f"{hf_name}.weight"] + scale * (b @ a)
        torch.testing.assert_close(rebuilt, merged[f"{hf_name}.weight"], atol=1e-6, rtol=0)
        assert b.abs().max() > 0  # stage 2 moved the LoRA off its zero start: the check has teeth
    with pytest.raises(FileExistsError):
        export_lora("tiny:test", s2.adapter_dir, out)


def test_merge_lora_only_command(trained, tmp_path):
    s1, s2, _ = trained
    run = [sys.executable, "-m", "safevlm.cli", "merge", "--base", "tiny:test", "--lora-only"]
    ok = subprocess.run(run + ["--adapter", str(s2.adapter_dir), "--out", str(tmp_path / "lora")],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert f"--max-lora-rank 4 --lora-modules safevlm-lora={tmp_path / 'lora'}" in ok.stdout
    stage1 = subprocess.run(run + ["--adapter", str(s1.adapter_dir), "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=120)
    assert stage1.returncode == 2 and "only stage-2 adapters have a LoRA" in stage1.stderr
    assert "Traceback" not in stage1.stderr and not (tmp_path / "x").exists()


def _copy_adapter(src, dst, edit_config=None, edit_lora=None):
    shutil.copytree(src, dst)
    if edit_config:
        path = dst / "safety_config.json"
        path.write_text(json.dumps(edit_config(json.loads(path.read_text()))))
    if edit_lora:
        path = dst / "lora" / "adapter_config.json"
        path.write_text(json.dumps(edit_lora(json.loads(path.read_text()))))
    return dst


def test_what_vllm_cannot_serve_is_refused_and_prefix_tokens_are_warned_about(trained, tmp_path, caplog):
    _, s2, _ = trained
    dora = _copy_adapter(s2.adapter_dir, tmp_path / "dora", edit_lora=lambda c: {**c, "use_dora": True})
    with pytest.raises(ValueError, match="use_dora is set; vLLM does not serve DoRA"):
        export_lora("tiny:test", dora, tmp_path / "o1")
    tower = _copy_adapter(s2.adapter_dir, tmp_path / "tower")
    weights = _weights(tower / "lora" / "adapter_model.safetensors")
    from safetensors.torch import save_file

    key = next(iter(weights))
    weights[key.replace("model.language_model.", "model.vision_tower.")] = weights.pop(key)
    save_file(weights, str(tower / "lora" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="vision_tower.* is not a LoRA weight of the language model"):
        export_lora("tiny:test", tower, tmp_path / "o2")
    prefixed = _copy_adapter(s2.adapter_dir, tmp_path / "prefixed", edit_config=lambda c: {**c, "num_prefix_tokens": 8})
    with caplog.at_level(logging.WARNING, logger="safevlm.merge"):
        export_lora("tiny:test", prefixed, tmp_path / "o3")
    assert "trained with 8 prefix safety tokens" in caplog.text
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
