"""SafetyCollator: chat template, image-token expansion, assistant-only labels, padding, truncation."""

from __future__ import annotations

import io

import pytest
import torch
from data_fixtures import llava15_processor
from PIL import Image

from safevlm.data import SafetyRecord, Turn
from safevlm.data import build_messages
from safevlm.data.collator import IGNORE_INDEX, SafetyCollator


def png(colour=(200, 0, 0), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def rec(rid="a", image=b"", turns=None, level=0, type_=6):
    turns = turns or [Turn("user", "<image>\nWhat is in the image?"), Turn("assistant", "It is a red circle.")]
    return SafetyRecord(rid, png() if image == b"" else image, turns, level, type_, "test")


MULTI = [
    Turn("user", "<image>\nWhat is in the image?"),
    Turn("assistant", "It is a red circle."),
    Turn("user", "And the colour?"),
    Turn("assistant", "The shape is blue."),
]


def labelled_text(batch, tokenizer, row):
    labels = batch["labels"][row]
    return tokenizer.decode(labels[labels != IGNORE_INDEX])


def test_build_messages_puts_the_image_first_and_drops_the_placeholder():
    messages = build_messages(MULTI, True, system="Be safe.")
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": "Be safe."}]}
    assert messages[1] == {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}],
    }
    assert messages[3]["content"] == [{"type": "text", "text": "And the colour?"}]  # image only once
    assert build_messages(rec(image=None).turns, False)[0]["content"] == [{"type": "text", "text": "What is in the image?"}]
    # chat-message dicts (inference) go through the same code: string contents become text parts
    assert build_messages([{"role": "user", "content": "<image>\nWhat is in the image?"}], True) == [messages[1]]
    assert build_messages("Hi", False) == [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    with pytest.raises(ValueError, match="message 0: role must be one of system, user, assistant, got 'bot'"):
        build_messages([{"role": "bot", "content": "Hi"}], False)
    with pytest.raises(ValueError, match="needs at least one user message"):
        build_messages([{"role": "system", "content": "Hi"}], False)
    with pytest.raises(ValueError, match="message 0 part 0: expected"):
        build_messages([{"role": "user", "content": [{"type": "video"}]}], False)


def test_llava15_conventions_labels_only_assistant_turns_with_eos():
    processor = llava15_processor()
    tok = processor.tokenizer
    batch = SafetyCollator(processor)(
        [
            rec(turns=MULTI),
            rec(
                "b",
                image=None,
                turns=[Turn("user", "How can I bake bread?"), Turn("assistant", "Sure, here are simple steps.")],
                level=2,
                type_=1,
            ),
        ]
    )
    assert set(batch) == {"input_ids", "attention_mask", "labels", "prompt_mask", "pixel_values", "risk_level",
                          "risk_type"}
    # llava-1.5-hf's template ends turns with a space; the collator appends EOS as LLaVA's training did
    assert labelled_text(batch, tok, 0) == "It is a red circle.</s> The shape is blue.</s>"
    assert labelled_text(batch, tok, 1) == "Sure, here are simple steps.</s>"
    text = tok.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert text.startswith(
        "<s> USER: <image><image><image><image>\nWhat is in the image? ASSISTANT: It is a red circle.</s>"
    )
    # 28-px images, 14-px patches: 2 x 2 patches + CLS - CLS ("default" strategy) = 4 image tokens
    assert (batch["input_ids"][0] == processor.image_token_id).sum() == 4
    assert (batch["input_ids"][1] == processor.image_token_id).sum() == 0
    assert batch["pixel_values"].shape == (1, 3, 28, 28)  # one image: only record "a" has one
    assert batch["risk_level"].tolist() == [0, 2] and batch["risk_type"].tolist() == [6, 1]
    assert batch["risk_level"].dtype == torch.long and batch["labels"].dtype == torch.long
    # left padding (the tokenizer's side): pads first, labelled -100, attention 0
    short = batch["attention_mask"][1]
    assert short[0] == 0 and short[-1] == 1
    assert (batch["labels"][1][short == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1][short == 0] == tok.pad_token_id).all()


def test_llava15_real_resolution_gives_576_image_tokens():
    processor = llava15_processor(image_size=336, patch_size=14)
    batch = SafetyCollator(processor)([rec()])
    assert (batch["input_ids"][0] == processor.image_token_id).sum() == 576
    assert batch["pixel_values"].shape == (1, 3, 336, 336)


def test_same_ids_and_pixels_as_the_llava_processor():
    processor = llava15_processor()
    record = rec()
    # llava-1.5's conversation with the answer ended by EOS, expanded and tokenised by LlavaProcessor itself
    # (the text ends with the answer's EOS, as LLaVA's conversations do: the template's trailing
    # separator after the last answer is never a token)
    text = "USER: <image>\nWhat is in the image? ASSISTANT: It is a red circle.</s>"
    rendered = processor.apply_chat_template(build_messages(record.turns, True), tokenize=False)
    assert rendered == text.replace("</s>", "") + " "
    reference = processor(text=text, images=[Image.open(io.BytesIO(record.image)).convert("RGB")], return_tensors="pt")
    batch = SafetyCollator(processor)([record])
    assert batch["input_ids"].tolist() == reference["input_ids"].tolist()
    assert batch["attention_mask"].tolist() == reference["attention_mask"].tolist()
    assert torch.equal(batch["pixel_values"], reference["pixel_values"])


def test_last_assistant_only():
    processor = llava15_processor()
    batch = SafetyCollator(processor, train_on="last_assistant")([rec(turns=MULTI)])
    assert labelled_text(batch, processor.tokenizer, 0) == "The shape is blue.</s>"
    with pytest.raises(ValueError, match="train_on must be one of assistant, last_assistant"):
        SafetyCollator(processor, train_on="all")


def test_truncation_cuts_text_from_the_right_and_counts_prefix_tokens():
    processor = llava15_processor()
    full = SafetyCollator(processor)([rec(turns=MULTI)])
    length = int(full["attention_mask"].sum())
    cut = SafetyCollator(processor, max_length=length - 3, num_prefix_tokens=5)([rec(turns=MULTI)])
    assert cut["input_ids"].shape[1] == length - 8  # text + image + 5 prefix = max_length
    assert cut["input_ids"][0].tolist() == full["input_ids"][0, : length - 8].tolist()
    assert (cut["input_ids"][0] == processor.image_token_id).sum() == 4  # image tokens intact


def test_image_tokens_are_never_cut():
    processor = llava15_processor()
    with pytest.raises(
        ValueError,
        match=r"record 'a': \d+ tokens up to the end of the image \(4 image tokens\) "
        r"\+ 3 prefix tokens exceed max_length 8",
    ):
        SafetyCollator(processor, max_length=8, num_prefix_tokens=3)([rec()])


def test_placeholders_in_text_never_become_image_tokens():
    processor = llava15_processor()
    turns = [Turn("user", "Look"), Turn("assistant", "Ok"), Turn("user", "<image> again")]
    bad = SafetyRecord("x", None, turns, 0, 6, "t")
    # placeholders are stripped from turns, so a record without image has no image tokens
    batch = SafetyCollator(processor)([bad])
    assert (batch["input_ids"] == processor.image_token_id).sum() == 0


def test_collator_arguments_are_checked():
    processor = llava15_processor()
    with pytest.raises(ValueError, match="no room beside 8 prefix tokens"):
        SafetyCollator(processor, max_length=8, num_prefix_tokens=8)
    with pytest.raises(ValueError, match="empty batch"):
        SafetyCollator(processor)([])


def test_image_root_and_bad_images(tmp_path):
    processor = llava15_processor()
    Image.new("RGB", (10, 10), (0, 0, 255)).save(tmp_path / "b.png")
    collator = SafetyCollator(processor, image_root=tmp_path)
    assert collator([rec(image="b.png")])["pixel_values"].shape == (1, 3, 28, 28)
    with pytest.raises(ValueError, match="escapes the image root"):
        collator([rec(image="../b.png")])


def test_tiny_default_processor():
    tiny = pytest.importorskip("safevlm.tiny")
    model, processor = tiny.build_tiny(preset="test", seed=0)
    batch = SafetyCollator(processor, num_prefix_tokens=2, max_length=200)([rec(turns=MULTI), rec("b")])
    tok = processor.tokenizer
    assert labelled_text(batch, tok, 0).strip() == "It is a red circle.</s> The shape is blue.</s>"
    # tiny "test" preset: 16-px images, 4-px patches -> 16 image features
    assert ((batch["input_ids"] == processor.image_token_id).sum(dim=1) == 16).all()
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    # the tiny template already ends assistant turns with EOS: exactly one per turn, none added
    assert (batch["input_ids"][0] == tok.eos_token_id).sum() == 2
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
    with torch.no_grad():
        out = model(**inputs)
    assert torch.isfinite(out.loss)
