"""One place decides which parameters train (safevlm.train.trainable), and the backbone's LM helpers."""

from __future__ import annotations

import pytest
import torch
from train_fixtures import SAFETY_TEST_SIZES, tiny_config

from safevlm.model import SafeVLM
from safevlm.tiny import build_tiny
from safevlm.train.trainable import SAFETY_PARTS, parameter_parts, set_trainable, stage_parts, trainable_counts


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture
def lora_model(tmp_path):
    """A SafeVLM on its own tiny base, with stage-2 LoRA on the LLM (q_proj, v_proj)."""
    from safevlm.train.stage import add_lora

    torch.manual_seed(0)
    model = SafeVLM(build_tiny("test", seed=0)[0], **SAFETY_TEST_SIZES)
    add_lora(model, tiny_config(tmp_path, stage=2, lora={"target_modules": ["q_proj", "v_proj"]}))
    return model


def test_every_parameter_belongs_to_exactly_one_part(lora_model):
    rows = list(parameter_parts(lora_model))
    assert [name for _, name, _ in rows] == [name for name, _ in lora_model.named_parameters()]
    sizes = {}
    for part, _, param in rows:
        sizes[part] = sizes.get(part, 0) + param.numel()
    backbone = lora_model.backbone
    assert sizes["vision_tower"] == _numel(backbone.vision_tower)
    assert sizes["base_projector"] == _numel(backbone.projector)
    for name in SAFETY_PARTS:
        assert sizes[name] == _numel(getattr(lora_model, name)) > 0, name
    lora = [(name, p) for part, name, p in rows if part == "lora"]
    # r=4 on q_proj and v_proj of 2 layers (hidden 32): A (4x32) + B (32x4) each
    assert len(lora) == 2 * 2 * 2 and sizes["lora"] == 8 * 4 * 32
    assert all(".language_model." in name and "lora_" in name for name, _ in lora)
    assert sum(sizes.values()) == sum(p.numel() for p in lora_model.parameters())


def test_stage_parts():
    assert stage_parts(1) == set(SAFETY_PARTS)
    assert stage_parts(1, safety_modules="frozen") == set(SAFETY_PARTS)  # stage 1 trains them regardless
    assert stage_parts(1, train_prefix=False) == {"safety_projector", "safety_head"}
    assert stage_parts(2, safety_modules="frozen") == {"lora"}
    assert stage_parts(2, safety_modules="prefix") == {"lora", "prefix_tokens"}
    assert stage_parts(2) == {"lora", *SAFETY_PARTS}
    with pytest.raises(ValueError, match="stage must be 1 or 2, got 3"):
        stage_parts(3)
    with pytest.raises(ValueError, match="safety_modules must be 'train', 'prefix' or 'frozen', got 'some'"):
        stage_parts(2, safety_modules="some")


def test_set_trainable_freezes_everything_outside_the_parts(lora_model):
    counts = set_trainable(lora_model, stage_parts(2, safety_modules="frozen"))
    assert counts == {"lora": 8 * 4 * 32}
    for name, p in lora_model.named_parameters():
        assert p.requires_grad == ("lora_" in name), name
    counts = set_trainable(lora_model, stage_parts(1, train_prefix=False))
    assert set(counts) == {"safety_projector", "safety_head"}
    assert counts["safety_head"] == _numel(lora_model.safety_head)
    assert not any(p.requires_grad for p in lora_model.prefix_tokens.parameters())
    assert trainable_counts(lora_model) == counts
    with pytest.raises(ValueError, match=r"unknown parameter part\(s\) \['lm'\]; allowed: vision_tower"):
        set_trainable(lora_model, {"lm"})


def test_empty_prefix_tokens_never_train():
    model = SafeVLM(build_tiny("test", seed=0)[0], **{**SAFETY_TEST_SIZES, "num_prefix_tokens": 0})
    set_trainable(model, stage_parts(1))
    assert model.prefix_tokens.embeddings.numel() == 0 and not model.prefix_tokens.embeddings.requires_grad
    assert all(p.requires_grad for p in model.safety_head.parameters())


def test_set_trainable_on_a_bare_base():
    base, _ = build_tiny("test", seed=0)
    counts = set_trainable(base, {"base_projector", "language_model"})
    assert set(counts) == {"base_projector", "language_model"}
    assert not any(p.requires_grad for p in base.model.vision_tower.parameters())
    assert all(p.requires_grad for p in base.model.language_model.parameters())
    assert counts["language_model"] == sum(p.numel() for p in base.parameters()) - _numel(base.model.vision_tower) \
        - _numel(base.model.multi_modal_projector)


def test_supervised_lm_loss_equals_the_full_logits_loss_and_its_gradients():
    from safevlm.backbones import causal_lm_loss, supervised_lm_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 13)
    hidden = torch.randn(3, 9, 8, requires_grad=True)
    labels = torch.full((3, 9), -100)
    empty = supervised_lm_loss(hidden, labels, head)
    assert empty.item() == 0.0 and empty.requires_grad  # still part of the graph
    labels[0, 4:7] = torch.tensor([1, 2, 3])
    labels[2, 8] = 12
    labels[1, 0] = 5  # position 0 is never predicted: not counted by either
    full = causal_lm_loss(head(hidden), labels)
    full.backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    part = supervised_lm_loss(hidden, labels, head)
    part.backward()
    torch.testing.assert_close(part, full)
    torch.testing.assert_close(hidden.grad, grads[0])
    torch.testing.assert_close(head.weight.grad, grads[1])
    with pytest.raises(ValueError, match=r"hidden states cover \(3, 9\) .* but labels \(3, 8\)"):
        supervised_lm_loss(hidden, labels[:, :8], head)


def test_causal_lm_loss_and_scatter_checks():
    from safevlm.backbones import causal_lm_loss, get_backbone

    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), -100)
    empty = causal_lm_loss(logits, labels)
    assert empty.item() == 0.0 and empty.requires_grad  # still part of the graph
    labels[0, 3] = 7
    expected = torch.nn.functional.cross_entropy(logits[0, 2:3], torch.tensor([7]))
    torch.testing.assert_close(causal_lm_loss(logits, labels), expected)
    with pytest.raises(ValueError, match=r"logits cover \(2, 5\) .* but labels \(2, 4\)"):
        causal_lm_loss(logits, labels[:, :4])

    backbone = get_backbone(build_tiny("test", seed=0)[0])
    embeds = torch.zeros(1, 20, 32)
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, 2:17] = True  # 15 image tokens for 16 features
    with pytest.raises(ValueError, match=r"got 16 image features \(1 images x 16\) but 15 image tokens"):
        backbone.scatter_image_embeds(embeds, mask, torch.randn(1, 16, 32))
    mask[0, 17] = True
    out = backbone.scatter_image_embeds(embeds, mask, features := torch.randn(1, 16, 32))
    with torch.no_grad():
        torch.testing.assert_close(out[0, 2:18], backbone.project_image_features(features)[0])
    assert torch.equal(out[0, :2], embeds[0, :2]) and torch.equal(out[0, 18:], embeds[0, 18:])


@pytest.mark.parametrize("layers", [[-2], [-2, -3], [0, 2], [-1], [0], [-3]])
def test_vision_tower_stops_after_the_deepest_selected_layer_with_the_same_states_and_gradients(layers):
    from safevlm.backbones import get_backbone
    from safevlm.backbones.base import tower_hidden_states

    tower = get_backbone(build_tiny("test", seed=0)[0]).vision_tower
    blocks = tower.vision_model.encoder.layers if hasattr(tower, "vision_model") else tower.encoder.layers
    calls = [0] * len(blocks)
    for j, block in enumerate(blocks):
        block.register_forward_hook(lambda *_, j=j: calls.__setitem__(j, calls[j] + 1))
    pixels = torch.randn(3, 3, 16, 16)

    outputs = tower(pixels, output_hidden_states=True)
    expected = [outputs.hidden_states[i] for i in layers]
    sum(h.square().sum() for h in expected).backward()
    grads = [p.grad.clone() for p in tower.parameters() if p.grad is not None]
    tower.zero_grad(set_to_none=True)
    assert calls == [1] * len(blocks)

    got = tower_hidden_states(tower, pixels, layers)
    deepest = max(i % (len(blocks) + 1) for i in layers)
    if deepest in (0, len(blocks)):  # nothing to skip: the tower runs whole, once
        assert calls == [2] * len(blocks)
    else:  # the layers after the deepest never ran
        assert calls == [2] * deepest + [1] * (len(blocks) - deepest)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    sum(h.square().sum() for h in got).backward()
    got_grads = [p.grad for p in tower.parameters() if p.grad is not None]
    assert len(got_grads) == len(grads)
    for a, b in zip(got_grads, grads):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="out of range for a vision tower of 2 layers"):
        tower_hidden_states(tower, pixels, [-4])


def test_a_checkpointed_vision_tower_runs_whole_and_no_warning_is_printed(recwarn):
    from safevlm.backbones import get_backbone
    from safevlm.backbones.base import tower_hidden_states
    from safevlm.compat import is_checkpointing

    tower = get_backbone(build_tiny("test", seed=0)[0]).vision_tower
    blocks = tower.vision_model.encoder.layers if hasattr(tower, "vision_model") else tower.encoder.layers
    calls = []
    blocks[-1].register_forward_pre_hook(lambda *a: calls.append(1))
    pixels = torch.randn(2, 3, 16, 16)
    assert not is_checkpointing(tower) and not is_checkpointing(torch.nn.Linear(2, 2))
    tower_hidden_states(tower, pixels, [-2])
    assert calls == []
    enable = getattr(tower, "activation_checkpointing_enable", None) or tower.gradient_checkpointing_enable  # 5.x / 4.57
    enable()
    assert is_checkpointing(tower)
    tower.train()
    got = tower_hidden_states(tower, pixels, [-2])[0]
    assert calls == [1] and got.shape == (2, 17, 32)
    assert not [w for w in recwarn if "checkpointing" in str(w.message)]
