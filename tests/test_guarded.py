"""Guarded generation: one vision pass, mixed actions in one batch, refusals never reach the LLM,
hint placement, fail-closed, and the `classify` / `chat` commands on a saved tiny folder."""

from __future__ import annotations

import argparse
import io
import json
import logging
from dataclasses import replace

import pytest
from conftest import make_image, make_inputs
from guarded_fixtures import count_calls, scripted_guard

from safevlm.guarded import (
    ChatSession,
    build_messages,
    classify,
    generate_guarded,
    insert_hint,
    render,
)
from safevlm.policy import Policy, PolicyOverrideError, PolicyOverrides


@pytest.fixture
def scripted(safe_model, tiny_processor):
    with scripted_guard(safe_model, tiny_processor.tokenizer):
        yield safe_model


GEN = {"max_new_tokens": 5, "do_sample": False}


def test_mixed_batch_one_vision_pass_and_refusals_never_reach_the_llm(scripted, tiny_processor):
    model = scripted
    prompts = ["What is this? [allow]", "How do I do it? [hint]", "Tell me how. [refuse]"]
    images = [make_image(i) for i in range(3)]
    policy = Policy.default()
    with count_calls(model.backbone.vision_tower) as vision, count_calls(model.backbone.language_model) as llm:
        results = generate_guarded(model, tiny_processor, images, prompts, policy, **GEN)
    assert len(vision) == 1  # classification and generation share one vision pass over all 3 images
    assert [r.action for r in results] == ["allow", "hint", "refuse"]
    # one generate call over the 2 non-refused samples: every LLM step sees batch 2
    assert llm and {shape[0] for shape in llm} == {2}
    assert results[2].text == policy.refusal_text("illegal") and results[2].completion_tokens == 0
    assert results[2].finish_reason == "refused"
    assert results[1].hint == policy.hint_text("illegal", 2) and results[0].hint is None
    assert (results[1].risk_level, results[1].risk_type, results[1].decided_by) == (2, "illegal", "illegal")
    assert results[0].level_probs == pytest.approx([0.97, 0.01, 0.01, 0.01], abs=1e-6)
    assert 1 <= results[0].completion_tokens <= 5 and results[0].prompt_tokens > 16
    # the hinted prompt is longer by the hint's tokens
    assert results[1].prompt_tokens > results[0].prompt_tokens + 10
    d = results[1].to_dict()
    assert {"text", "action", "risk_level", "risk_type", "level_probs", "type_probs", "hint"} <= set(d)
    assert json.loads(json.dumps(d))["type_probs"]["illegal"] == pytest.approx(0.9)


def test_all_refused_batch_never_runs_the_llm(scripted, tiny_processor):
    with count_calls(scripted.backbone.language_model) as llm:
        results = generate_guarded(scripted, tiny_processor, [make_image(0), make_image(1)],
                                   ["a [refuse]", "b [refuse]"], "default", **GEN)
    assert llm == [] and [r.action for r in results] == ["refuse", "refuse"]


def test_allowed_answers_match_plain_generation_and_batching(scripted, tiny_processor):
    """Guarded 'allow' tokenises exactly as the processor does, and batching with hinted or
    refused neighbours does not change a sample's answer."""
    model, processor = scripted, tiny_processor
    prompt = "What is shown in the image? [allow]"
    inputs = make_inputs(processor, [prompt], seed=0)
    plain = model.generate(**inputs, **GEN)
    expected = processor.batch_decode(plain, skip_special_tokens=True)[0].strip()
    alone = generate_guarded(model, processor, make_image(0), prompt, "default", **GEN)[0]
    batched = generate_guarded(model, processor, [make_image(5), make_image(0), make_image(6)],
                               ["Explain. [hint]", prompt, "No. [refuse]"], "default", **GEN)
    assert alone.text == expected
    assert batched[1].text == expected and batched[1].action == "allow"


def test_hint_goes_into_the_system_message_or_the_user_turn(scripted, tiny_processor, monkeypatch):
    model, processor = scripted, tiny_processor
    seen = []
    real_generate = model.generate

    def spy(input_ids, **kwargs):
        seen.append(processor.tokenizer.batch_decode(input_ids, skip_special_tokens=False))
        return real_generate(input_ids, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    system = Policy.default()
    user = replace(system, hint_position="user")
    hint = system.hint_text("illegal", 2)
    generate_guarded(model, processor, make_image(0), "Do it. [hint]", system, **GEN)
    generate_guarded(model, processor, make_image(0), "Do it. [hint]", user, **GEN)
    as_system, as_user = seen[0][0], seen[1][0]
    assert as_system.index(hint) < as_system.index("USER:") < as_system.index("Do it. [hint]")
    assert as_user.index("USER:") < as_user.index("Do it. [hint]") < as_user.index(hint) < as_user.index("ASSISTANT:")


def test_hint_helpers_keep_the_original_conversation():
    messages = build_messages([{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], True)
    sys_hint = insert_hint(messages, "CAREFUL", "system")
    assert [p["text"] for p in sys_hint[0]["content"]] == ["Be brief.", "CAREFUL"] and len(sys_hint) == 2
    user_hint = insert_hint(messages, "CAREFUL", "user")
    assert user_hint[1]["content"][1]["text"] == "Hi\nCAREFUL"
    assert messages[1]["content"][1]["text"] == "Hi"  # unchanged
    with pytest.raises(ValueError, match="has 1 image part"):
        build_messages(messages, False)


def test_head_exception_fails_closed_and_is_logged(safe_model, tiny_processor, caplog):
    def boom(*args, **kwargs):
        raise RuntimeError("head exploded")

    handle = safe_model.safety_head.register_forward_pre_hook(boom)
    try:
        with caplog.at_level(logging.WARNING), count_calls(safe_model.backbone.language_model) as llm:
            results = generate_guarded(safe_model, tiny_processor, [make_image(0)], ["Hi"], "default", **GEN)
    finally:
        handle.remove()
    assert results[0].action == "refuse" and "head exploded" in results[0].error
    assert llm == []
    assert any("safety head failed" in r.getMessage() for r in caplog.records)
    assert any("action refuse" in r.getMessage() for r in caplog.records)


def test_nan_head_output_fails_closed_or_hints_by_policy(scripted, tiny_processor, caplog):
    with caplog.at_level(logging.WARNING, logger="safevlm.policy"):
        refused = generate_guarded(scripted, tiny_processor, make_image(0), "x [nan]", "default", **GEN)[0]
    assert refused.action == "refuse" and "not finite" in refused.error
    assert caplog.records
    hinted = generate_guarded(scripted, tiny_processor, make_image(0), "x [nan]", "hint_only", **GEN)[0]
    assert hinted.action == "hint" and hinted.completion_tokens >= 1


def test_overrides_in_guarded_generation(scripted, tiny_processor):
    images, prompts = [make_image(0), make_image(1)], ["who is this [privacy]", "who is this [privacy]"]
    out = generate_guarded(scripted, tiny_processor, images, prompts, "default",
                           overrides=[PolicyOverrides(allow_types=("privacy",)), None], **GEN)
    assert [r.action for r in out] == ["allow", "refuse"]
    with count_calls(scripted.backbone.vision_tower) as vision, pytest.raises(PolicyOverrideError):
        generate_guarded(scripted, tiny_processor, images[0], "x", "default",
                         overrides=PolicyOverrides(allow_types=("illegal",)), **GEN)
    assert vision == []  # refused before any work


def test_text_only_and_mixed_inputs(scripted, tiny_processor):
    out = generate_guarded(scripted, tiny_processor, [None, make_image(0)], ["Hello [allow]", "Hi [allow]"],
                           "default", **GEN)
    assert [r.action for r in out] == ["allow", "allow"] and all(r.completion_tokens >= 1 for r in out)
    assert out[0].prompt_tokens < out[1].prompt_tokens  # no image tokens in the text-only prompt


def test_classify_never_runs_the_llm_and_matches_guard(safe_model, tiny_processor):
    images = [make_image(0), make_image(1)]
    with count_calls(safe_model.backbone.language_model) as llm, count_calls(safe_model.backbone.vision_tower) as vision:
        decisions = classify(safe_model, tiny_processor, images, ["What is it?", "Describe it."])
        image_only = classify(safe_model, tiny_processor, images)
    assert llm == [] and len(vision) == 2
    inputs = make_inputs(tiny_processor, ["What is it?", "Describe it."])
    guard = safe_model.guard(**inputs)
    for row, d in enumerate(decisions):
        assert d.level_probs == pytest.approx(guard.level_probs[row].tolist(), abs=1e-5)
        assert d.risk_type == safe_model.config.taxonomy.type_name(int(guard.risk_type[row]))
    assert image_only[0].level_probs != decisions[0].level_probs


def test_chat_session_keeps_the_history(scripted, tiny_processor):
    session = ChatSession(scripted, tiny_processor, "default", image=make_image(0), **GEN)
    first = session.ask("What is it? [allow]")
    second = session.ask("And now? [refuse]")
    assert (first.action, second.action) == ("allow", "refuse")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert second.prompt_tokens > first.prompt_tokens  # the history is part of the prompt
    rendered = render(tiny_processor, session.messages[:3])
    assert rendered.count("<image>") == 1 and first.text in rendered


# -- CLI on a saved folder -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A saved tiny LLaVA folder (as `safevlm tiny build` writes), an adapter and an image file."""
    from safevlm.model import SafeVLM
    from safevlm.tiny import save_tiny

    root = tmp_path_factory.mktemp("tiny")
    save_tiny(root / "model", preset="test", seed=0)
    model = SafeVLM.from_pretrained(str(root / "model"), num_prefix_tokens=4, num_query_tokens=4, head_num_heads=4)
    model.save_pretrained(root / "adapter")
    make_image(3, size=40).save(root / "image.png")
    return root


def _run(command: str, argv: list[str]) -> int:
    import importlib

    module = importlib.import_module(f"safevlm.commands.{command}")
    parser = argparse.ArgumentParser()
    module.register(parser.add_subparsers())
    args = parser.parse_args([command, *argv])
    return args.func(args)


def test_classify_command_prints_decisions(tiny_folder, capsys):
    image = str(tiny_folder / "image.png")
    code = _run("classify", ["--model", str(tiny_folder / "model"), "--adapter", str(tiny_folder / "adapter"),
                             "--image", image, "--image", image, "--prompt", "What is it?", "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and len(lines) == 2 and lines[0]["image"] == image
    assert lines[0]["action"] in ("allow", "hint", "refuse")
    assert sum(lines[0]["level_probs"]) == pytest.approx(1, abs=1e-3)
    assert lines[0]["level_probs"] == lines[1]["level_probs"]  # same input, same answer in one batch
    _run("classify", ["--model", str(tiny_folder / "model"), "--image", image])
    text = capsys.readouterr().out
    assert text.startswith(f"{image}: ") and "risk level" in text and "types:" in text


def test_chat_command_single_and_interactive(tiny_folder, capsys, monkeypatch):
    common = ["--model", str(tiny_folder / "model"), "--adapter", str(tiny_folder / "adapter"),
              "--image", str(tiny_folder / "image.png"), "--max-new-tokens", "4", "--json"]
    assert _run("chat", [*common, "--prompt", "What is it?"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["action"] in ("allow", "hint", "refuse") and isinstance(one["text"], str)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is it?\n/reset\n/bogus\n\nAnd this?\n/quit\nnever read\n"))
    assert _run("chat", common) == 0
    out = capsys.readouterr().out.splitlines()
    answers = [json.loads(line) for line in out if line.startswith("{")]
    assert len(answers) == 2 and "[conversation reset]" in out
    assert any("unknown command /bogus" in line for line in out)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is it?\nAnd this?\n"))  # no reset: history grows
    assert _run("chat", common) == 0
    kept = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert kept[0]["prompt_tokens"] == answers[0]["prompt_tokens"]
    assert kept[1]["prompt_tokens"] > answers[1]["prompt_tokens"] + kept[0]["completion_tokens"]


def test_chat_command_rejects_bad_arguments(tiny_folder, tmp_path):
    model = str(tiny_folder / "model")
    (tmp_path / "not_image.png").write_text("hello")
    with pytest.raises(ValueError, match="is not an image"):
        _run("chat", ["--model", model, "--image", str(tmp_path / "not_image.png"), "--prompt", "x"])
    with pytest.raises(PolicyOverrideError, match="does not let requests allow"):
        _run("chat", ["--model", model, "--allow-type", "illegal", "--prompt", "x"])
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        _run("classify", ["--model", str(tmp_path / "nothing"), "--image", str(tiny_folder / "image.png")])
