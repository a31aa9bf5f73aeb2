"""The model side of `safevlm eval`: base alone (its own generate on the same chat prompt),
base + adapter (head recorded, every input answered), base + adapter + policy (the serving
path), one vision pass per batch, greedy and seeded decoding, failures isolated per item."""

from __future__ import annotations

import pytest
import torch
from eval_fixtures import eval_env, load_env_model  # noqa: F401  (fixture)
from guarded_fixtures import count_calls

from safevlm.eval.generation import (
    BaseGenerator,
    GuardedGenerator,
    allow_all_policy,
    check_decoding,
    load_system,
    system_from_model,
)
from safevlm.eval.items import EvalItem
from safevlm.eval.runner import GenerationRequest
from safevlm.eval.tasks import load_task


@pytest.fixture(scope="module")
def loaded(eval_env):  # noqa: F811
    model, processor = load_env_model(eval_env)
    task = load_task("demo_heldout")
    items = task.read(eval_env["data"]).items[:6]
    requests = [GenerationRequest(item, task.render_prompt(item), {"max_new_tokens": 6}) for item in items]
    return model, processor, requests


def test_base_alone_is_the_base_models_own_generate_on_the_same_chat_prompt(loaded):
    from safevlm.data import open_image

    model, processor, requests = loaded
    base = model.base_model
    answers = BaseGenerator(base, processor)(requests[:3])
    for request, answer in zip(requests[:3], answers):
        # what a user of transformers would write: the processor's chat template and image processor
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request.prompt}]}],
            add_generation_prompt=True)
        image = open_image(request.item.image, request.item.image_root)
        inputs = processor(images=image, text=text, return_tensors="pt")
        with torch.inference_mode():
            out = base.generate(**inputs, max_new_tokens=6, do_sample=False)
        expected = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert answer.error is None and answer.head is None
        assert answer.text == expected


def test_adapter_system_records_the_head_and_answers_everything(loaded):
    model, processor, requests = loaded
    policy = allow_all_policy(model.config.taxonomy)
    assert all(not policy.rule(t).enabled for t in model.config.type_names if t != "safe")
    answers = GuardedGenerator(model, processor, policy)(requests)
    assert len(answers) == len(requests)
    for a in answers:
        assert a.error is None and a.head["action"] == "allow"
        assert set(a.head["type_probs"]) == set(model.config.type_names) and len(a.head["level_probs"]) == 4
        assert abs(sum(a.head["type_probs"].values()) - 1) < 1e-3 and "text" not in a.head
        assert a.head["completion_tokens"] >= 1


def test_guarded_system_refuses_without_running_the_llm_and_batches_one_vision_pass(loaded):
    from safevlm.eval.sweep import policy_at
    from safevlm.policy import load_policy

    model, processor, requests = loaded
    refuse_all = policy_at(load_policy("default"), 0.0001, refuse_level="low")
    generator = GuardedGenerator(model, processor, refuse_all)
    with count_calls(model.backbone.language_model) as llm, count_calls(model.backbone.vision_tower) as vision:
        answers = generator(requests)
    assert [a.head["action"] for a in answers] == ["refuse"] * len(requests)
    assert all(a.text == refuse_all.refusal_text(a.head["decided_by"]) for a in answers)
    assert llm == [] and len(vision) == 1 and vision[0][0] == len(requests)  # one vision pass for the batch
    allow = GuardedGenerator(model, processor, allow_all_policy())
    with count_calls(model.backbone.vision_tower) as vision:
        allow(requests)
    assert len(vision) == 1  # the guard's vision features are reused by generation


def test_greedy_by_default_and_seeded_sampling_is_repeatable(loaded):
    model, processor, requests = loaded
    assert check_decoding(None) == {"do_sample": False}
    assert check_decoding({"temperature": 0.7}) == {"do_sample": True, "temperature": 0.7}
    with pytest.raises(ValueError, match="unknown decoding setting 'beams'"):
        check_decoding({"beams": 2})
    sampled = GuardedGenerator(model, processor, allow_all_policy(), {"temperature": 1.5}, seed=3)
    first = [a.text for a in sampled(requests)]
    torch.manual_seed(12345)  # the global state does not matter: each batch is seeded from the run seed
    assert [a.text for a in sampled(requests)] == first
    other = GuardedGenerator(model, processor, allow_all_policy(), {"temperature": 1.5}, seed=4)
    assert [a.text for a in other(requests)] != first
    greedy = GuardedGenerator(model, processor, allow_all_policy())
    assert [a.text for a in greedy(requests)] == [a.text for a in greedy(list(reversed(requests)))][::-1]


def test_a_bad_image_fails_only_its_item(loaded, tmp_path):
    model, processor, requests = loaded
    (tmp_path / "broken.png").write_bytes(b"not a png")
    bad = EvalItem(id="bad", prompt="hi", image="broken.png", image_root=str(tmp_path))
    batch = [requests[0], GenerationRequest(bad, "hi", {"max_new_tokens": 6}), requests[1]]
    for generator in (GuardedGenerator(model, processor, allow_all_policy()), BaseGenerator(model.base_model, processor)):
        answers = generator(batch)
        assert answers[1].text is None and "not an image" in answers[1].error and "broken.png" in answers[1].error
        assert answers[0].error is None and answers[2].error is None and answers[0].text is not None


def test_load_system_modes_keys_and_manifest(eval_env):  # noqa: F811
    from safevlm.errors import UsageError

    with pytest.raises(UsageError, match="--policy needs --adapter"):
        load_system(eval_env["base"], None, "default")
    base = load_system(eval_env["base"], decoding={"max_new_tokens": 4})
    assert base.mode == "base" and base.key.adapter == "" and base.key.policy == ""
    adapter = load_system(eval_env["base"], eval_env["adapter"], device="cpu")
    guarded = load_system(eval_env["base"], eval_env["adapter"], "strict", device="cpu", seed=7)
    assert (adapter.mode, guarded.mode) == ("adapter", "guarded")
    assert adapter.key.adapter == guarded.key.adapter != "" and adapter.key.policy == "" and guarded.key.policy == "strict"
    m = guarded.manifest([load_task("demo_heldout")], [])
    assert m["decoding"] == {"do_sample": False, "dtype": "float32"} and m["seeds"]["torch"] == 7
    assert m["policy"]["source"] == "strict" and m["policy"]["name"] == "strict" and len(m["policy"]["sha256"]) == 64
    assert m["extra"]["mode"] == "guarded" and m["adapter"]["sha256"] and m["model"]["sha256"]
    assert base.manifest([], [])["decoding"]["max_new_tokens"] == 4
    # a model in memory (what the demo evaluates)
    system = system_from_model(adapter.model, adapter.processor, None, model_label="m", adapter_label=None)
    assert system.mode == "adapter" and system.key.as_tuple() == ("m", "", "")
