"""SafeVLM: transparency, one vision pass, padding invariance, freezing, save/load, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_inputs

from safevlm.config import SafetyConfig
from safevlm.model import SafeVLM

PROMPTS = ["What is shown in the image?", "Describe it."]


def test_transparency_without_prefix_tokens(tiny):
    base, processor = tiny
    model = SafeVLM(base, num_prefix_tokens=0, head_num_heads=4).eval()
    inputs = make_inputs(processor, ["What is shown in the image?"])
    with torch.no_grad():
        ours = model(**inputs).logits
        theirs = base(**inputs).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_prefix_tokens_lengthen_the_sequence_and_change_logits(tiny, safe_model):
    base, processor = tiny
    inputs = make_inputs(processor, PROMPTS)
    with torch.no_grad():
        ours = safe_model(**inputs).logits
        theirs = base(**inputs).logits
    assert ours.shape[1] == theirs.shape[1] + 4
    # the last position sees the prefix tokens, so its logits differ from the base
    assert (ours[:, -1] - theirs[:, -1]).abs().max().item() > 1e-4


def test_prefix_tokens_sit_right_before_the_first_image_token(safe_model, tiny_processor):
    inputs = make_inputs(tiny_processor, PROMPTS)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = torch.arange(ids.numel()).view_as(ids)
    embeds, new_mask, new_labels = safe_model.build_inputs_embeds(ids, mask, safe_model.encode_images(inputs["pixel_values"]), labels)
    prefix = safe_model.prefix_tokens.embeddings
    image_id = safe_model.config.image_token_id
    for b in range(ids.shape[0]):
        first = int((ids[b] == image_id).nonzero()[0])
        assert torch.equal(embeds[b, first:first + 4], prefix)
        assert (new_labels[b, first:first + 4] == -100).all()
        assert torch.equal(new_labels[b, :first], labels[b, :first])
        assert torch.equal(new_labels[b, first + 4:], labels[b, first:])
        assert new_mask[b, first:first + 4].all()
    assert int(new_mask.sum()) == int(mask.sum()) + 4 * ids.shape[0]


def _count_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda *a: calls.append(1))  # a pass starts (the tower may stop early)
    return calls, handle


def test_vision_tower_runs_once_per_forward_and_generate(safe_model, tiny_processor):
    inputs = make_inputs(tiny_processor, PROMPTS)
    calls, handle = _count_calls(safe_model.backbone.vision_tower)
    try:
        with torch.no_grad():
            safe_model(**inputs, risk_level=torch.tensor([0, 1]), risk_type=torch.tensor([6, 1]))
        assert len(calls) == 1
        calls.clear()
        out = safe_model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert len(calls) == 1
        assert out.shape[0] == 2 and 1 <= out.shape[1] <= 4
    finally:
        handle.remove()


def test_guard_never_calls_the_language_model(safe_model, tiny_processor):
    inputs = make_inputs(tiny_processor, PROMPTS)

    def boom(*args, **kwargs):
        raise AssertionError("the language model was called in guard mode")

    lm_handle = safe_model.backbone.language_model.register_forward_pre_hook(boom)
    head_handle = safe_model.backbone.lm_head.register_forward_pre_hook(boom)
    calls, vision_handle = _count_calls(safe_model.backbone.vision_tower)
    try:
        out = safe_model.guard(**inputs)
    finally:
        lm_handle.remove()
        head_handle.remove()
        vision_handle.remove()
    assert len(calls) == 1
    assert out.level_probs.shape == (2, 4) and out.type_probs.shape == (2, 7)
    torch.testing.assert_close(out.level_probs.sum(-1), torch.ones(2))
    torch.testing.assert_close(out.type_probs.sum(-1), torch.ones(2))


def test_guard_matches_forward_head_logits(safe_model, tiny_processor):
    inputs = make_inputs(tiny_processor, PROMPTS)
    with torch.no_grad():
        full = safe_model(**inputs)
    guard = safe_model.guard(**inputs)
    torch.testing.assert_close(full.level_logits, guard.level_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(full.type_logits, guard.type_logits, atol=1e-6, rtol=0)


def test_head_is_padding_invariant(safe_model, tiny_processor):
    short = "Hi?"
    long = "Please describe every object you can see in this picture in great detail."
    alone = make_inputs(tiny_processor, [short])
    batch = make_inputs(tiny_processor, [short, long])
    assert batch["input_ids"].shape[1] > alone["input_ids"].shape[1]  # the short one is padded
    a = safe_model.guard(**alone)
    b = safe_model.guard(**batch)
    assert (a.level_logits[0] - b.level_logits[0]).abs().max().item() <= 1e-5
    assert (a.type_logits[0] - b.type_logits[0]).abs().max().item() <= 1e-5


def test_answer_tokens_are_hidden_from_the_head(safe_model, tiny_processor):
    inputs = make_inputs(tiny_processor, ["What is it?"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = torch.full_like(ids, -100)
    labels[0, -3:] = ids[0, -3:]
    prompt = safe_model.prompt_mask(ids, mask, labels)
    assert not prompt[0, -3:].any()
    assert not prompt[ids == safe_model.config.image_token_id].any()
    assert int(prompt.sum()) == int(mask.sum()) - 3 - int((ids == safe_model.config.image_token_id).sum())


def test_stage1_gradients_reach_the_safety_parameters_only():
    from safevlm.tiny import build_tiny
    from safevlm.train.trainable import set_trainable, stage_parts

    base, processor = build_tiny("test", seed=0)  # its own base: the session one is shared
    model = SafeVLM(base, num_prefix_tokens=4, num_query_tokens=4, head_num_heads=4)
    set_trainable(model, stage_parts(1))
    inputs = make_inputs(processor, PROMPTS)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -3:] = inputs["input_ids"][:, -3:]  # supervise the last tokens; the rest is prompt
    out = model(**inputs, labels=labels, risk_level=torch.tensor([0, 3]), risk_type=torch.tensor([6, 1]))
    torch.testing.assert_close(out.loss, out.lm_loss + out.level_loss + out.type_loss)  # unweighted
    out.loss.backward()
    safety = {id(p) for p in model.safety_parameters()}
    for name, p in model.named_parameters():
        if id(p) in safety:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_lm_loss_is_the_next_token_cross_entropy_of_the_base(tiny):
    base, processor = tiny
    model = SafeVLM(base, num_prefix_tokens=0, num_query_tokens=4, head_num_heads=4).eval()
    inputs = make_inputs(processor, PROMPTS)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -4:] = inputs["input_ids"][:, -4:]
    with torch.no_grad():
        ours = model(**inputs, labels=labels)
        theirs = base(**inputs, labels=labels)
    torch.testing.assert_close(ours.lm_loss, theirs.loss, atol=1e-5, rtol=1e-5)
    assert ours.lm_loss.item() > 0


def test_compute_lm_false_skips_the_language_model(safe_model, tiny_processor):
    inputs = make_inputs(tiny_processor, PROMPTS)
    handle = safe_model.backbone.language_model.register_forward_pre_hook(
        lambda *a: (_ for _ in ()).throw(AssertionError("the LLM ran"))
    )
    try:
        out = safe_model(**inputs, labels=inputs["input_ids"], risk_level=torch.tensor([0, 3]),
                         risk_type=torch.tensor([6, 1]), compute_lm=False)
    finally:
        handle.remove()
    assert out.logits is None and out.lm_loss is None
    torch.testing.assert_close(out.loss, out.level_loss + out.type_loss)


def test_an_adapter_saved_with_loss_weights_in_its_config_loads_and_runs_the_llm(tmp_path, tiny, safe_model):
    """Adapters written before the loss weights moved to the recipe hold them in safety_config.json
    (stage 1 with w_lm = 0 wrote lm_loss_weight: 0); they load, and forward(labels=...) still
    runs the LLM and returns the LM loss."""
    safe_model.save_pretrained(tmp_path)
    path = tmp_path / "safety_config.json"
    saved = json.loads(path.read_text())
    assert "lm_loss_weight" not in saved and "cls_loss_weight" not in saved
    path.write_text(json.dumps({**saved, "cls_loss_weight": 1.0, "lm_loss_weight": 0.0}))
    loaded = SafeVLM.from_pretrained(tiny[0], tmp_path)
    inputs = make_inputs(tiny[1], PROMPTS)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -2:] = inputs["input_ids"][:, -2:]
    with torch.no_grad():
        out = loaded(**inputs, labels=labels)
        expected = safe_model(**inputs, labels=labels)
    assert out.logits is not None and out.lm_loss is not None
    assert torch.equal(out.logits, expected.logits) and torch.equal(out.lm_loss, expected.lm_loss)


def test_save_load_round_trip_holds_only_safety_weights(tmp_path, tiny, safe_model):
    from safetensors import safe_open

    base, processor = tiny
    with torch.no_grad():  # make weights non-trivial so a missed load would show
        for p in safe_model.safety_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    safe_model.save_pretrained(tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["safety_config.json", "safety_model.safetensors"]
    with safe_open(str(tmp_path / "safety_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.split(".")[0] in SafeVLM.SAFETY_MODULES for k in keys)
    base_keys = set(base.state_dict())
    assert not base_keys & set(keys)
    base_numel = sum(p.numel() for p in base.parameters())
    saved_numel = sum(t.numel() for t in safe_model.safety_state_dict().values())
    assert saved_numel < base_numel
    saved_config = json.loads((tmp_path / "safety_config.json").read_text())
    assert saved_config["num_prefix_tokens"] == 4
    from safevlm.bases import base_fingerprint

    assert saved_config["base_fingerprint"] == base_fingerprint(base)  # the adapter names its base

    loaded = SafeVLM.from_pretrained(base, tmp_path)
    inputs = make_inputs(processor, PROMPTS)
    with torch.no_grad():
        a, b = safe_model(**inputs), loaded(**inputs)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.level_logits, b.level_logits) and torch.equal(a.type_logits, b.type_logits)


def test_adapter_for_another_base_is_refused(tmp_path, safe_model):
    from safevlm.tiny import build_config, build_processor
    from transformers import LlavaForConditionalGeneration

    safe_model.save_pretrained(tmp_path)
    config = build_config("test", build_processor("test").tokenizer)
    config.text_config.hidden_size = 48
    other = LlavaForConditionalGeneration(config)
    with pytest.raises(ValueError, match="text_hidden_size: 32 here vs 48 in the base"):
        SafeVLM.from_pretrained(other, tmp_path)


def test_mismatched_image_tokens_raise_with_numbers(safe_model, tiny_processor):
    inputs = make_inputs(tiny_processor, ["What is it?"])
    ids = inputs["input_ids"].clone()
    first = int((ids[0] == safe_model.config.image_token_id).nonzero()[0])
    ids[0, first] = 5  # one image token fewer
    with pytest.raises(ValueError, match=r"got 16 image features .* but 15 image tokens"):
        safe_model(input_ids=ids, pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"])


def test_unknown_projector_kind_and_bad_config_values(tiny):
    with pytest.raises(ValueError, match="unknown projector_kind 'resampler'; allowed: mlp, cabstractor"):
        SafeVLM(tiny[0], projector_kind="resampler")
    with pytest.raises(ValueError, match="square num_safety_features"):
        SafetyConfig(projector_kind="cabstractor", num_safety_features=10)
    with pytest.raises(ValueError, match="dropout"):
        SafetyConfig(dropout=1.5)
    with pytest.raises(ValueError, match="unknown SafetyConfig field"):
        SafeVLM(tiny[0], num_prefix_token=3)


def test_unsupported_base_family_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match="unsupported base model family 'llama'; supported: gemma3, llava, llava_next"):
        SafeVLM(lm)


def test_cabstractor_projector_pools_to_a_square_grid(tiny):
    model = SafeVLM(tiny[0], projector_kind="cabstractor", num_safety_features=4, num_prefix_tokens=2, head_num_heads=4).eval()
    features = torch.randn(3, 16, 32)
    assert model.safety_projector(features).shape == (3, 4, 32)
    out = model.guard(input_ids=None, vision_features=features)
    assert out.type_probs.shape == (3, 7)


def test_batched_generate_matches_single_with_prefix_tokens(safe_model, tiny_processor):
    batch = make_inputs(tiny_processor, PROMPTS)
    single = make_inputs(tiny_processor, [PROMPTS[1]], seed=1)
    out_batch = safe_model.generate(**batch, max_new_tokens=5, do_sample=False)
    out_single = safe_model.generate(**single, max_new_tokens=5, do_sample=False)
    n = out_single.shape[1]
    assert torch.equal(out_batch[1, :n], out_single[0])


def test_conditioned_prefix_tokens_start_static_and_carry_the_head_state(tiny):
    base, processor = tiny
    torch.manual_seed(0)
    model = SafeVLM(base, num_prefix_tokens=3, num_query_tokens=4, head_num_heads=4).eval()
    static = SafeVLM(base, SafetyConfig.from_dict({**model.config.to_dict(), "prefix_conditioning": "none"})).eval()
    static.load_state_dict(model.state_dict(), strict=False)
    inputs = make_inputs(processor, PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, static(**inputs).logits)  # zero-initialised
        model.prefix_tokens.condition.weight.normal_()
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        features = model.encode_images(inputs["pixel_values"])
        embeds, _, _ = model.build_inputs_embeds(ids, mask, features)
        state = model.guard(**inputs).vision_features  # same vision features, one pass
        head = model._head(ids, mask, state)
    image_id = model.config.image_token_id
    for b in range(2):
        first = int((ids[b] == image_id).nonzero()[0])
        expected = model.prefix_tokens.embeddings + model.prefix_tokens.condition(head.safety_state[b])
        torch.testing.assert_close(embeds[b, first:first + 3], expected)
    # two different inputs get different prefixes
    first0 = int((ids[0] == image_id).nonzero()[0])
    first1 = int((ids[1] == image_id).nonzero()[0])
    assert (embeds[0, first0] - embeds[1, first1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="unknown prefix_conditioning 'film'; allowed: head, decision, none"):
        SafetyConfig(prefix_conditioning="film")


def _decision_model(base):
    torch.manual_seed(0)
    model = SafeVLM(base, num_prefix_tokens=3, num_query_tokens=4, head_num_heads=4,
                    prefix_conditioning="decision").eval()
    with torch.no_grad():
        model.prefix_tokens.condition.weight.normal_()
    return model


def test_decision_conditioned_prefix_tokens_carry_the_heads_decision(tiny):
    base, processor = tiny
    model = _decision_model(base)
    n_levels, n_types = model.config.num_levels, model.config.num_types
    assert model.prefix_tokens.condition.in_features == n_levels + n_types
    inputs = make_inputs(processor, PROMPTS)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        features = model.encode_images(inputs["pixel_values"])
        embeds, _, _ = model.build_inputs_embeds(ids, mask, features)
        head = model._head(ids, mask, features)
        level, kind = model._decide(head.level_logits, head.type_logits)
        decision = torch.cat([torch.nn.functional.one_hot(level, model.config.num_levels),
                              torch.nn.functional.one_hot(kind, model.config.num_types)], dim=-1).float()
        torch.testing.assert_close(model.prefix_state(head.safety_state), decision)
        # calibration temperatures change the guard's probabilities, not the decision the LLM reads
        model.safety_head.level_temperature.fill_(3.0)
        model.safety_head.type_temperature.fill_(0.5)
        recalibrated, _, _ = model.build_inputs_embeds(ids, mask, features)
    torch.testing.assert_close(recalibrated, embeds)
    image_id = model.config.image_token_id
    for b in range(2):
        first = int((ids[b] == image_id).nonzero()[0])
        expected = model.prefix_tokens.embeddings + model.prefix_tokens.condition(decision[b])
        torch.testing.assert_close(embeds[b, first:first + 3], expected)


def test_the_decision_is_risky_when_the_two_classifiers_mean_safe_probability_is_below_half(tiny):
    base, _ = tiny
    model = _decision_model(base)
    safe = model.config.taxonomy.safe_type_id
    n_types = model.config.num_types

    def type_probs(p_safe, risky_type):
        rest = (1 - p_safe) / (n_types - 1)
        probs = [rest] * n_types
        probs[safe] = p_safe
        probs[risky_type] += 0.01
        probs[(risky_type + 1) % n_types if (risky_type + 1) % n_types != safe else (risky_type + 2) % n_types] -= 0.01
        return probs

    level_probs = torch.tensor([
        [0.40, 0.30, 0.29, 0.01],  # argmax safe, mean safe 0.35: risky, the likeliest risky level (1)
        [0.40, 0.30, 0.29, 0.01],  # level argmax safe, type says safe: mean 0.55, safe
        [0.30, 0.05, 0.05, 0.60],  # both say risky: level 3
        [0.90, 0.04, 0.03, 0.03],  # both say safe
    ])
    risky_type = 0 if safe != 0 else 1
    types = torch.tensor([type_probs(0.30, risky_type), type_probs(0.70, risky_type), type_probs(0.10, risky_type),
                          type_probs(0.95, risky_type)])
    level, kind = model._decide(level_probs.log(), types.log())
    assert level.tolist() == [1, 0, 3, 0]
    assert kind.tolist() == [risky_type, safe, risky_type, safe]


def test_a_decision_given_for_a_row_replaces_the_heads_for_that_row_only(tiny):
    base, processor = tiny
    model = _decision_model(base)
    n_levels = model.config.num_levels
    inputs = make_inputs(processor, PROMPTS)
    with torch.no_grad():
        head = model._head(inputs["input_ids"], inputs["attention_mask"], model.encode_images(inputs["pixel_values"]))
        own_level, own_type = (int(x[1]) for x in model._decide(head.level_logits, head.type_logits))
    # a decision for row 1 that is not the head's own (else nothing would change)
    given = (2 if own_level != 2 else 3, 1 if own_type != 1 else 2)
    level, kind = torch.tensor([-1, given[0]]), torch.tensor([-1, given[1]])
    with torch.no_grad():
        plain = model(**inputs)
        swapped = model(**inputs, condition_level=level, condition_type=kind)
        state = model._head(inputs["input_ids"], inputs["attention_mask"],
                            model.encode_images(inputs["pixel_values"])).safety_state
        decision = model.prefix_state(state, level, kind)
    torch.testing.assert_close(decision[0], model.prefix_state(state)[0])
    assert decision[1].tolist() == [float(i == given[0]) for i in range(n_levels)] + [
        float(i == given[1]) for i in range(model.config.num_types)]
    # the head's outputs never change; the LLM reads the given decision in row 1 only
    torch.testing.assert_close(swapped.type_logits, plain.type_logits)
    torch.testing.assert_close(swapped.logits[0], plain.logits[0])
    assert (swapped.logits[1] - plain.logits[1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match=rf"row 1: condition level 9 / type {given[1]} is not a decision"):
        model(**inputs, condition_level=torch.tensor([-1, 9]), condition_type=kind)
    with pytest.raises(ValueError, match=r"row 0: condition level 2 / type -1"):
        model(**inputs, condition_level=torch.tensor([2, -1]), condition_type=torch.tensor([-1, -1]))
    with pytest.raises(ValueError, match="go together"):
        model(**inputs, condition_level=level)
    head_model = SafeVLM(base, num_prefix_tokens=3, num_query_tokens=4, head_num_heads=4).eval()
    with pytest.raises(ValueError, match="prefix_conditioning='decision'.*this model has prefix_conditioning='head'"):
        head_model(**inputs, condition_level=level, condition_type=kind)
    with pytest.raises(ValueError, match="prefix_conditioning='decision'"):
        head_model(**inputs, compute_lm=False, condition_level=level, condition_type=kind)


def test_generate_reuses_the_guard_state_with_decision_conditioning(tiny):
    base, processor = tiny
    model = _decision_model(base)
    inputs = make_inputs(processor, PROMPTS)
    guard = model.guard(**inputs)
    reused = model.generate(**inputs, vision_features=guard.vision_features, safety_state=guard.safety_state,
                            max_new_tokens=4, do_sample=False)
    assert torch.equal(reused, model.generate(**inputs, max_new_tokens=4, do_sample=False))


def test_generate_reuses_the_guard_state_without_a_second_head_pass(tiny):
    base, processor = tiny
    torch.manual_seed(0)
    model = SafeVLM(base, num_prefix_tokens=3, num_query_tokens=4, head_num_heads=4).eval()
    with torch.no_grad():
        model.prefix_tokens.condition.weight.normal_()
    inputs = make_inputs(processor, PROMPTS)
    guard = model.guard(**inputs)
    assert guard.safety_state.shape == (2, model.config.head_hidden_size)
    calls, handle = _count_calls(model.safety_head)
    try:
        reused = model.generate(**inputs, vision_features=guard.vision_features, safety_state=guard.safety_state,
                                max_new_tokens=4, do_sample=False)
        assert not calls
        fresh = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert len(calls) == 1
    finally:
        handle.remove()
    assert torch.equal(reused, fresh)


def test_from_pretrained_resolves_dtype_names(tmp_path, tiny, safe_model):
    safe_model.save_pretrained(tmp_path)
    loaded = SafeVLM.from_pretrained(tiny[0], tmp_path, dtype="auto")  # float32 on CPU: the base is unchanged
    assert tiny[0].lm_head.weight.dtype is torch.float32
    assert loaded.safety_head.level_classifier.weight.dtype is torch.float32
    half = SafeVLM.from_pretrained("tiny:test", tmp_path, dtype="bfloat16", device="cpu")
    assert half.safety_head.level_classifier.weight.dtype is torch.bfloat16
    assert half.backbone.lm_head.weight.dtype is torch.bfloat16
    alias = SafeVLM.from_pretrained(tiny[0], tmp_path, torch_dtype="float32")  # the old keyword still works
    assert alias.safety_head.level_classifier.weight.dtype is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'float99'; allowed: auto, float32, bfloat16, float16"):
        SafeVLM.from_pretrained(tiny[0], tmp_path, dtype="float99")


def _head_config(**overrides):
    return SafetyConfig(text_hidden_size=32, vision_hidden_size=16, num_image_features=9, head_hidden_size=32,
                        head_num_heads=4, head_num_layers=1, num_query_tokens=4, dropout=0.0, **overrides)


def test_prompt_token_dropout_hides_prompt_tokens_in_training_only():
    from safevlm.modules.head import SafetyHead

    torch.manual_seed(0)
    head = SafetyHead(_head_config(prompt_token_dropout=0.5))
    feats, prompt = torch.randn(3, 9, 32), torch.randn(3, 12, 32)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[2, 8:] = False  # padding stays hidden
    head.eval()
    plain = head(feats, prompt, mask)
    again = head(feats, prompt, mask)
    torch.testing.assert_close(plain.type_logits, again.type_logits)  # eval: deterministic, nothing hidden

    head.train()
    torch.manual_seed(1)
    trained = head(feats, prompt, mask)
    torch.manual_seed(1)
    kept = mask & (torch.rand(mask.shape) >= 0.5)  # the same draw, made by hand
    assert 0 < int(kept.sum()) < int(mask.sum()) and not kept[2, 8:].any()
    head.eval()
    by_hand = head(feats, prompt, kept)
    torch.testing.assert_close(trained.type_logits, by_hand.type_logits)
    assert (trained.type_logits - plain.type_logits).abs().max() > 1e-4

    # over many draws about the configured share is hidden, never the padding
    head.train()
    big = torch.ones(64, 200, dtype=torch.bool)
    big[:, 150:] = False
    shares = [1 - head._drop_prompt_tokens(big, has_image=True)[:, :150].float().mean().item() for _ in range(5)]
    assert all(abs(s - 0.5) < 0.02 for s in shares), shares
    assert not head._drop_prompt_tokens(big, has_image=True)[:, 150:].any()


def test_prompt_token_dropout_keeps_a_text_only_sample_attending():
    from safevlm.modules.head import SafetyHead

    head = SafetyHead(_head_config(prompt_token_dropout=0.95)).train()
    mask = torch.zeros(256, 3, dtype=torch.bool)
    mask[:, 0] = True  # one prompt token each, and no image features
    torch.manual_seed(0)
    kept = head._drop_prompt_tokens(mask, has_image=False)
    assert kept[:, 0].all()  # every row would have been emptied by the draw: each keeps its token
    out = head(None, torch.randn(256, 3, 32), mask)  # no "nothing to attend to" error
    assert out.type_logits.shape == (256, 7)
    assert head._drop_prompt_tokens(mask, has_image=True)[:, 0].float().mean() < 0.2


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_prompt_token_dropout_is_validated(value):
    with pytest.raises(ValueError, match="prompt_token_dropout must be in"):
        _head_config(prompt_token_dropout=value)
