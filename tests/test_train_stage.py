"""Stage 1 and stage 2 on the tiny 'test' model: what trains, what is saved, what is logged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from train_fixtures import SAFETY_TEST_SIZES, keyword_records, one_thread, tiny_config  # noqa: F401 (fixture)

from safevlm.model import SafeVLM
from safevlm.tiny import build_tiny
from safevlm.train import run_stage
from safevlm.train.trainer import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def records():
    return keyword_records(64, seed=0), keyword_records(28, seed=1, prefix="v")


def _fresh(seed: int = 0):
    base, processor = build_tiny("test", seed=0)
    torch.manual_seed(seed)
    return SafeVLM(base, **SAFETY_TEST_SIZES), processor


def _base_state(model):
    inner = model.backbone.model
    # LoRA renames a wrapped layer's weight to <layer>.base_layer.weight
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in inner.state_dict().items() if "lora_" not in k}


def _never(*args, **kwargs):
    raise AssertionError("this module must not run")


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, records):
    """Stage 1 with w_lm = 0 on prompt-separable records; the LLM and the vision tower (after
    the cache fill) are forbidden to run during training."""
    tmp = tmp_path_factory.mktemp("s1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, processor = _fresh()
    before = _base_state(model)
    safety_before = {k: v.clone() for k, v in model.safety_state_dict().items()}
    config = tiny_config(tmp, optim={"epochs": 6, "lr": 5e-3}, log={"save_steps": 0})
    calls = {"vision": 0}
    fill_done = {"flag": False}

    def count_vision(*args):
        if fill_done["flag"]:
            calls["vision"] += 1

    from transformers import TrainerCallback

    class MarkTrainBegin(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            fill_done["flag"] = True

    handles = [
        model.backbone.language_model.register_forward_pre_hook(_never),
        model.backbone.vision_tower.register_forward_pre_hook(count_vision),
    ]
    try:
        result = run_stage(config, model=model, processor=processor, train_records=records[0],
                           val_records=records[1], callbacks=[MarkTrainBegin()])
    finally:
        for h in handles:
            h.remove()
        torch.set_num_threads(threads)
    return result, before, safety_before, calls, tmp


def test_stage1_trains_only_safety_modules_and_learns(stage1):
    result, before, safety_before, calls, _ = stage1
    model = result.model
    after = _base_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "a base weight changed in stage 1"
    changed = [k for k, v in model.safety_state_dict().items() if not torch.equal(v, safety_before[k])]
    assert any(k.startswith("safety_head.") for k in changed) and any(k.startswith("safety_projector.") for k in changed)
    # w_lm = 0: the prefix tokens (read only by the LLM) are left as they were
    assert torch.equal(model.prefix_tokens.embeddings, safety_before["prefix_tokens.embeddings"])
    assert calls["vision"] == 0, "the vision tower ran during training despite the warm cache"
    # the prompt names the type: the head learns it on held-out records
    assert result.metrics["eval_type_accuracy"] >= 0.9
    assert result.metrics["eval_type_macro_f1"] >= 0.85
    assert result.cache["computed"] == 64 + 28


def test_stage1_adapter_holds_only_safety_weights(stage1):
    result = stage1[0]
    files = sorted(p.name for p in result.adapter_dir.iterdir())
    assert files == ["safety_config.json", "safety_model.safetensors"]
    with safe_open(str(result.adapter_dir / "safety_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(result.model.safety_state_dict())
    loaded = SafeVLM.from_pretrained(build_tiny("test")[0], result.adapter_dir)
    for key, value in result.model.safety_state_dict().items():
        assert torch.equal(loaded.safety_state_dict()[key], value), key
    saved = json.loads((result.adapter_dir / "safety_config.json").read_text())
    assert saved["num_prefix_tokens"] == 4
    assert not {"cls_loss_weight", "lm_loss_weight"} & set(saved)  # training settings stay in the recipe
    # Trained with w_lm = 0, the reloaded adapter still runs the LLM and gives an LM loss for labels.
    from safevlm.data import SafetyCollator

    batch = SafetyCollator(build_tiny("test")[1], num_prefix_tokens=4)(keyword_records(2, seed=5))
    with torch.no_grad():
        out = loaded.eval()(**batch)
    assert out.logits.shape[:2] == (2, batch["input_ids"].shape[1] + 4)
    assert out.lm_loss is not None and out.lm_loss.item() > 0
    torch.testing.assert_close(out.loss, out.level_loss + out.type_loss + out.lm_loss)


def test_stage1_logs_metrics_jsonl_and_loss_png(stage1):
    result = stage1[0]
    entries = read_metrics(result.output_dir / "metrics.jsonl")
    train = [e for e in entries if "loss" in e]
    evals = [e for e in entries if "eval_type_macro_f1" in e]
    assert len(evals) == 6  # one per epoch
    assert {"eval_level_accuracy", "eval_level_macro_f1", "eval_type_accuracy"} <= set(evals[-1])
    assert all({"level_loss", "type_loss"} <= set(e) and "lm_loss" not in e for e in train)
    assert train[-1]["loss"] < train[0]["loss"]
    assert [e["step"] for e in train] == sorted(e["step"] for e in train)
    png = result.output_dir / "loss.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (result.output_dir / "train_config.yaml").read_text().startswith("# safevlm train --config")


def test_stage1_with_lm_loss_runs_the_llm_and_trains_prefix_tokens(tmp_path, records):
    model, processor = _fresh()
    prefix_before = model.prefix_tokens.embeddings.detach().clone()
    calls = []
    handle = model.backbone.language_model.register_forward_pre_hook(lambda *a: calls.append(1))
    config = tiny_config(tmp_path, loss={"lm_weight": 1.0}, optim={"epochs": 1},
                         log={"save_steps": 0, "eval_steps": 0, "plot": False})
    try:
        result = run_stage(config, model=model, processor=processor, train_records=records[0][:16])
    finally:
        handle.remove()
    assert calls and not torch.equal(result.model.prefix_tokens.embeddings, prefix_before)
    entries = [e for e in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in e]
    assert entries and all("lm_loss" in e for e in entries)


def test_stage1_without_cache_matches_the_cached_run_closely(tmp_path, records):
    results = {}
    for cached in (True, False):
        model, processor = _fresh()
        config = tiny_config(tmp_path / str(cached), cache={"enabled": cached},
                             model={"safety": {**SAFETY_TEST_SIZES, "dropout": 0.0}},
                             optim={"epochs": 1}, log={"save_steps": 0, "eval_steps": 0, "plot": False})
        results[cached] = run_stage(config, model=model, processor=processor, train_records=records[0][:24]).model
    a, b = (r.safety_state_dict() for r in (results[True], results[False]))
    # Same data order and updates; only float summation order differs (cached features, one
    # placeholder instead of N). Adam normalises every step, so a float-level difference in a
    # tiny gradient can move a weight by a small fraction of the learning rate (3e-3).
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 0.2 * 3e-3
    from safevlm.data import SafetyCollator

    batch = SafetyCollator(build_tiny("test")[1], num_prefix_tokens=4)(records[1][:8])
    with torch.no_grad():
        out_a, out_b = (results[c].eval()(**batch, compute_lm=False) for c in (True, False))
    torch.testing.assert_close(out_a.type_logits, out_b.type_logits, atol=2e-3, rtol=0)


def test_stage2_lora_on_llm_linear_layers_only(tmp_path, stage1, records):
    s1 = stage1[0]
    model = SafeVLM.from_pretrained(build_tiny("test")[0], s1.adapter_dir)
    processor = build_tiny("test")[1]
    before = _base_state(model)
    safety_before = {k: v.clone() for k, v in model.safety_state_dict().items()}
    config = tiny_config(tmp_path, stage=2, model={"safety_modules": "frozen"}, optim={"epochs": 1},
                         log={"save_steps": 0, "plot": False})
    result = run_stage(config, model=model, processor=processor, train_records=records[0][:16],
                       val_records=records[1][:8])
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in result.model.named_parameters() if ".lora_A." in n}
    assert lora_modules and all(".language_model." in n for n in lora_modules)
    llama_linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {n.rsplit(".", 1)[-1] for n in lora_modules} == llama_linear
    assert len(lora_modules) == 7 * 2  # 7 linear layers x 2 decoder layers
    after = _base_state(result.model)
    assert all(torch.equal(before[k], after[k]) for k in before), "a base weight changed in stage 2"
    # safety_modules: frozen
    assert all(torch.equal(v, safety_before[k]) for k, v in result.model.safety_state_dict().items())
    adapter = result.adapter_dir
    assert sorted(p.name for p in adapter.iterdir()) == ["lora", "safety_config.json", "safety_model.safetensors"]
    assert (adapter / "lora" / "adapter_config.json").is_file()
    with safe_open(str(adapter / "lora" / "adapter_model.safetensors"), "pt") as f:
        lora_keys = list(f.keys())
    assert lora_keys and all("lora_" in k for k in lora_keys)  # never a base weight
    reloaded = SafeVLM.from_pretrained(build_tiny("test")[0], adapter)
    from conftest import make_inputs

    inputs = make_inputs(processor, ["What is it?"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, result.model(**inputs).logits)
    assert result.metrics["eval_loss"] > 0 and "eval_type_macro_f1" in result.metrics


def test_stage2_trains_safety_modules_when_asked_and_merge_matches(tmp_path, stage1, records):
    from safevlm.train import merge_lora

    s1 = stage1[0]
    config = tiny_config(tmp_path, stage=2, model={"base": "tiny:test", "adapter": str(s1.adapter_dir)},
                         lora={"target_modules": ["q_proj", "v_proj"]}, optim={"epochs": 1},
                         log={"save_steps": 0, "eval_steps": 0, "plot": False})
    safety_before = SafeVLM.from_pretrained(build_tiny("test")[0], s1.adapter_dir).safety_state_dict()
    result = run_stage(config, processor=build_tiny("test")[1], train_records=records[0][:16])
    changed = [k for k, v in result.model.safety_state_dict().items() if not torch.equal(v, safety_before[k])]
    assert "prefix_tokens.embeddings" in changed and any(k.startswith("safety_head.") for k in changed)
    names = {n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for n, _ in result.model.named_parameters() if ".lora_A." in n}
    assert names == {"q_proj", "v_proj"}

    merged_dir = merge_lora("tiny:test", result.adapter_dir, tmp_path / "merged")
    assert sorted(p.name for p in (merged_dir / "safety_adapter").iterdir()) == ["safety_config.json", "safety_model.safetensors"]
    merged = SafeVLM.from_pretrained(merged_dir, merged_dir / "safety_adapter")
    assert not hasattr(merged.base_model, "peft_config")
    from conftest import make_inputs

    inputs = make_inputs(build_tiny("test")[1], ["What is shown?", "Describe it."])
    with torch.no_grad():
        a, b = result.model(**inputs), merged(**inputs)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.type_logits, b.type_logits, atol=1e-6, rtol=0)
    with pytest.raises(FileExistsError):
        merge_lora("tiny:test", result.adapter_dir, merged_dir)
    with pytest.raises(FileNotFoundError, match="only stage-2 adapters have a LoRA"):
        merge_lora("tiny:test", s1.adapter_dir, tmp_path / "m2")


def test_stage2_with_safety_modules_prefix_keeps_the_stage1_head_exactly(tmp_path, stage1, records):
    s1 = stage1[0]
    config = tiny_config(tmp_path, stage=2, model={"base": "tiny:test", "adapter": str(s1.adapter_dir),
                                                   "safety_modules": "prefix"},
                         optim={"epochs": 1}, log={"save_steps": 0, "eval_steps": 0, "plot": False})
    safety_before = SafeVLM.from_pretrained(build_tiny("test")[0], s1.adapter_dir).safety_state_dict()
    result = run_stage(config, processor=build_tiny("test")[1], train_records=records[0][:16])
    changed = {k for k, v in result.model.safety_state_dict().items() if not torch.equal(v, safety_before[k])}
    assert changed and all(k.startswith("prefix_tokens.") for k in changed), changed
    assert "prefix_tokens.embeddings" in changed
    assert any(".lora_A." in n for n, _ in result.model.named_parameters())


def test_lora_targets_outside_the_llm_are_refused(tmp_path, records):
    from safevlm.train.config import ConfigError

    model, processor = _fresh()
    config = tiny_config(tmp_path, stage=2, lora={"target_modules": ["fc1"]})  # a CLIP layer name
    with pytest.raises(ConfigError, match=r"\['fc1'\] are not linear layers of the language model"):
        run_stage(config, model=model, processor=processor, train_records=records[0][:8])


def test_a_fresh_run_never_mixes_with_an_earlier_runs_checkpoints(tmp_path, records):
    from safevlm.train.checkpoint import list_checkpoints

    def run(batch_size=8, **changes):
        model, processor = _fresh()
        config = tiny_config(tmp_path, optim={"epochs": 1, "batch_size": batch_size},
                             log={"save_steps": 1, "eval_steps": 0, "plot": False, "save_total_limit": None}, **changes)
        return run_stage(config, model=model, processor=processor, train_records=records[0][:16])

    first = run()
    assert [s for s, _ in list_checkpoints(first.output_dir)] == [2, 1]
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run .*pass --resume"):
        run()
    again = run(batch_size=16, overwrite=True)
    assert [s for s, _ in list_checkpoints(again.output_dir)] == [1]  # the old checkpoint-2 is gone


@pytest.mark.parametrize("cached", [True, False])
def test_group_by_length_batches_similar_lengths_in_training(tmp_path, records, cached):
    from safevlm.data import SafetyRecord, Turn

    # prompts of 1 to 24 extra words: plain shuffling pads most batches to near the longest
    varied = [SafetyRecord(r.id, r.image, [Turn("user", r.prompt + " please" * (k % 24)), r.turns[1]], r.risk_level,
                           r.risk_type, r.source) for k, r in enumerate(records[0])]
    spreads = {}
    for grouped in (False, True):
        model, processor = _fresh()
        seen = []

        def spy(module, args, kwargs):
            if module.training:
                seen.append(kwargs["attention_mask"].sum(1))

        handle = model.register_forward_pre_hook(spy, with_kwargs=True)
        config = tiny_config(tmp_path / f"{cached}{grouped}", cache={"enabled": cached},
                             data={"group_by_length": grouped, "balance_types": False},
                             optim={"epochs": 1}, log={"save_steps": 0, "eval_steps": 0, "plot": False})
        try:
            run_stage(config, model=model, processor=processor, train_records=varied)
        finally:
            handle.remove()
        assert sum(len(m) for m in seen) == len(varied)  # every record once per epoch either way
        spreads[grouped] = sum(int(m.max() - m.min()) for m in seen)
    assert spreads[True] < 0.5 * spreads[False], spreads
