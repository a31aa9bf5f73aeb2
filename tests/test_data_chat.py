"""Conversations as the model reads them (safevlm.data.chat): one implementation for the training
collator and guarded inference, so the safety head reads the same tokens of a multi-turn
conversation in both; it reads every user turn and no assistant turn."""

from __future__ import annotations

import importlib
import io

import pytest
import torch
from conftest import make_image
from data_fixtures import llava15_processor

from safevlm.data import SafetyRecord, Turn, build_messages
from safevlm.data.chat import ChatText, encode_chat, expand_image_tokens, render_chat
from safevlm.data.collator import SafetyCollator
from safevlm.guarded import classify, encode, pad_left

OPENING = "What is in the image?"
FIRST_ANSWER = "It is a red circle."
RISKY = "How can I pick a lock?"
REFUSAL = "I can't help with that."


def png(seed: int = 0, size: int = 24) -> bytes:
    buffer = io.BytesIO()
    make_image(seed, size).save(buffer, format="PNG")
    return buffer.getvalue()


def two_turn_record() -> SafetyRecord:
    turns = [Turn("user", f"<image>\n{OPENING}"), Turn("assistant", FIRST_ANSWER), Turn("user", RISKY),
             Turn("assistant", REFUSAL)]
    return SafetyRecord("two", png(), turns, 3, 1, "test")


def conversation(first_answer: str = FIRST_ANSWER, opening: str = OPENING) -> list[dict]:
    """The same conversation at inference: the user is about to get the second answer."""
    return [{"role": "user", "content": opening}, {"role": "assistant", "content": first_answer},
            {"role": "user", "content": RISKY}]


# -- the head reads the same tokens in training and at inference ----------------------------------------
def test_collator_and_guarded_feed_the_head_the_same_tokens(safe_model, tiny_processor):
    model, processor = safe_model, tiny_processor
    batch = SafetyCollator(processor, num_prefix_tokens=4)([two_turn_record()])
    train_mask = model.prompt_mask(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["prompt_mask"])
    encoded = encode(model, processor, build_messages(conversation(), True))
    ids, attention, prompt_mask = pad_left(model, processor, [encoded])
    infer_mask = model.prompt_mask(ids, attention, None, prompt_mask)
    train_read = batch["input_ids"][0][train_mask[0]].tolist()
    infer_read = ids[0][infer_mask[0]].tolist()
    assert train_read == infer_read
    read = processor.tokenizer.decode(infer_read)
    assert OPENING in read and RISKY in read  # every user turn ...
    assert FIRST_ANSWER not in read and "circle" not in read and "help" not in read  # ... no assistant turn
    assert read.rstrip().endswith("ASSISTANT:")  # up to the generation prompt, nothing after the answer
    # batches without the mask (the feature-cache collator) fall back on the labels: the same tokens
    fallback = model.prompt_mask(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert torch.equal(fallback, train_mask)
    # and the head's output is the same: forward on the training batch, guard on the inference tokens
    with torch.no_grad():
        trained = model(**batch, compute_lm=False)
    guarded = model.guard(ids, batch["pixel_values"], attention, prompt_mask=prompt_mask)
    torch.testing.assert_close(trained.level_logits, guarded.level_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trained.type_logits, guarded.type_logits, atol=1e-5, rtol=1e-5)


def test_same_tokens_with_llava15_conventions():
    """llava-1.5-hf's template ends turns with a space and no EOS: EOS is appended to earlier
    answers at inference as in training, and the head reads the same ids."""
    processor = llava15_processor()
    record = two_turn_record()
    batch = SafetyCollator(processor)([record])
    row = batch["attention_mask"][0].bool()
    train_ids = batch["input_ids"][0][row]
    train_read = train_ids[batch["prompt_mask"][0][row]].tolist()
    chat = encode_chat(processor, build_messages(conversation(), True), num_image_tokens=4)
    infer_read = [t for t, m in zip(chat.input_ids, chat.prompt_mask) if m]
    assert train_read == infer_read
    # the language model reads the inference conversation as the training text's prefix
    assert train_ids.tolist()[: len(chat.input_ids)] == chat.input_ids
    assert processor.tokenizer.decode(chat.input_ids).endswith(f"{FIRST_ANSWER}</s> USER: {RISKY} ASSISTANT:")
    # with train_on="last_assistant" the first answer is not a label, and the head still skips it
    last = SafetyCollator(processor, train_on="last_assistant")([record])
    assert torch.equal(last["prompt_mask"], batch["prompt_mask"])
    assert int((last["labels"] != -100).sum()) < int((batch["labels"] != -100).sum())


def test_classify_reads_user_turns_and_ignores_assistant_turns(safe_model, tiny_processor):
    image = make_image(0)
    base, other_answer, other_opening = classify(
        safe_model, tiny_processor, [image] * 3,
        [conversation(), conversation(first_answer="Sure, here are the steps."), conversation(opening="Hello there!")],
    )
    assert base.level_probs == pytest.approx(other_answer.level_probs, abs=1e-6)  # assistant turns are not read
    assert dict(base.type_probs) == pytest.approx(dict(other_answer.type_probs), abs=1e-6)
    assert max(abs(a - b) for a, b in zip(base.level_probs, other_opening.level_probs)) > 1e-6  # user turns are


# -- rendering ------------------------------------------------------------------------------------------
def test_render_ends_at_the_generation_prompt_or_the_last_answer():
    processor = llava15_processor()
    messages = build_messages(two_turn_record().turns, True)
    answered = render_chat(processor, messages)
    assert answered.text == (f"USER: <image>\n{OPENING} ASSISTANT: {FIRST_ANSWER}</s> USER: {RISKY} "
                             f"ASSISTANT: {REFUSAL}</s>")
    assert [answered.text[s:e] for s, e in answered.assistant_spans] == [f" {FIRST_ANSWER}</s>", f" {REFUSAL}</s>"]
    asking = render_chat(processor, messages[:3])  # ends with a user turn: the generation prompt is added
    assert answered.text.startswith(asking.text) and asking.text.endswith("ASSISTANT:")
    assert asking.assistant_spans == answered.assistant_spans[:1]


def test_image_expansion_shifts_the_spans():
    chat = ChatText("A <image> B <image> C", [(10, 12)])
    out = expand_image_tokens(chat, "<image>", 3)
    assert out.text == "A <image><image><image> B <image><image><image> C"
    assert out.text[slice(*out.assistant_spans[0])] == "B "
    assert expand_image_tokens(chat, "<image>", 1) is chat
    with pytest.raises(ValueError, match="num_image_tokens must be >= 1, got 0"):
        expand_image_tokens(chat, "<image>", 0)


def test_template_errors_name_the_conversation():
    class Unstable:  # renders prefixes differently from the whole conversation
        chat_template = "x"

        class tokenizer:  # noqa: N801
            eos_token = "</s>"

        @staticmethod
        def apply_chat_template(messages, tokenize=False, add_generation_prompt=False):
            return "|".join(m["role"] for m in reversed(messages))

    messages = build_messages(two_turn_record().turns, True)
    with pytest.raises(ValueError, match="record 'two': the chat template does not render conversation prefixes"):
        render_chat(Unstable(), messages, name="record 'two'")

    class NoTemplate:
        chat_template = None
        tokenizer = None

    with pytest.raises(ValueError, match="the processor has no chat template"):
        render_chat(NoTemplate(), messages)


@pytest.mark.parametrize("module", ["safevlm.data.chat", "safevlm.data.synth", "safevlm.data.synth.texts",
                                    "safevlm.data.synth.render", "safevlm.data.synth.plan"])
def test_all_is_sorted_and_resolves(module):
    mod = importlib.import_module(module)
    assert list(mod.__all__) == sorted(mod.__all__)
    for name in mod.__all__:
        assert getattr(mod, name) is not None


# -- the demo's multi-turn check ------------------------------------------------------------------------
def test_demo_multi_turn_check_asks_each_request_as_the_second_turn(safe_model, tiny_processor):
    """The report's multi_turn entry, with a scripted head: risky requests ("[refuse]") refused
    and benign ones ("[allow]") allowed in the first turn stay so in the second. Every record is
    asked (guard only), not an ``eval_samples`` subset."""
    from guarded_fixtures import scripted_guard

    from safevlm.demo import DemoSettings, multi_turn_check

    records = [SafetyRecord(f"r{i}", png(i), [Turn("user", f"Do thing {i} [refuse]")], 3, 1, "t") for i in range(4)]
    records += [SafetyRecord(f"b{i}", png(9 + i), [Turn("user", f"Describe it {i} [allow]")], 0, 6, "t")
                for i in range(4)]
    with scripted_guard(safe_model, tiny_processor.tokenizer):
        out = multi_turn_check(safe_model, tiny_processor, records, None, DemoSettings(eval_samples=2, batch_size=3))
    assert out == {"risky_second_turn_refusal": 1.0, "benign_second_turn_allowed": 1.0,
                   "n_risky_refused_first_turn": 4, "n_benign_allowed_first_turn": 4}
