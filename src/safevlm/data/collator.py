"""Training collator: records -> padded LLaVA inputs with assistant-only labels and risk labels.

:class:`SafetyCollator` turns a list of :class:`~safevlm.data.records.SafetyRecord` into the
standard LLaVA batch (``input_ids``, ``attention_mask``, ``pixel_values``) plus ``labels``
(``-100`` everywhere except the assistant turns, including their end-of-turn token), the
``prompt_mask`` of the tokens the safety head reads, and the risk labels the head is trained
on (``risk_level``, ``risk_type``).

The conversation goes through :func:`safevlm.data.chat.encode_chat`, the same code guarded
generation uses at inference, so it holds for any chat template (the tiny default's and
``llava-hf/llava-1.5-7b-hf``'s alike, without ``{% generation %}`` markers) and the head reads
the same tokens in training and at inference (see ``safevlm.data.chat`` for what it reads):

1. the record becomes HF multimodal messages (:func:`~safevlm.data.chat.build_messages`) and is
   rendered with the processor's chat template; a record that ends with a user turn (no
   answer) gets the generation prompt, one that ends with an answer stops at its end;
2. each assistant turn's character span is found by rendering the prefixes before and
   including it; EOS is appended to each where the template does not end turns with it
   (llava-1.5-hf), as in LLaVA's own training data;
3. the image placeholder is expanded to the number of image features exactly as the
   processor does (:func:`safevlm.backbones.process_images` reads the processor's own count,
   per image: anyres families give every image size its own), and the text is tokenised once
   with offsets: tokens inside the trained assistant spans keep their ids as labels, tokens
   outside every assistant span (image placeholders aside) form the prompt mask.

A record may carry a policy hint (``metadata["policy_hint"] = {"text", "position"}``,
:mod:`safevlm.train.hints`): the language model then reads the conversation with the hint
inserted as guarded generation inserts it (:func:`~safevlm.data.chat.insert_hint`), while the
head reads exactly the tokens it reads without the hint, as at inference, where the policy
hints only after the head has decided.

The model inserts the prefix safety tokens itself, so the batch stays standard LLaVA;
``num_prefix_tokens`` only counts against ``max_length``. Text is truncated from the right;
image tokens are never cut (a ``ValueError`` with the numbers says when they cannot fit).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence

from safevlm.data.chat import EncodedChat, build_messages, encode_chat, image_token_of, insert_hint
from safevlm.data.images import open_image
from safevlm.data.records import SafetyRecord

IGNORE_INDEX = -100
TRAIN_ON: tuple[str, ...] = ("assistant", "last_assistant")
# metadata key of a decision swap: [risk level, risk type] that condition the prefix tokens
# in place of the head's decision (safevlm.train.swaps)
PREFIX_DECISION_KEY = "prefix_decision"
# metadata key of a policy hint the language model reads in training: {"text", "position"}
# (safevlm.train.hints)
POLICY_HINT_KEY = "policy_hint"


def decision_tensors(records: Sequence[SafetyRecord]) -> dict:
    """``condition_level`` / ``condition_type`` (B,) long for a batch in which any record is a
    decision swap (``metadata[PREFIX_DECISION_KEY]`` = [level, type]), -1 for the others (the
    head's own decision); ``{}`` when none is."""
    import torch

    decisions = [r.metadata.get(PREFIX_DECISION_KEY) for r in records]
    if all(d is None for d in decisions):
        return {}
    levels, types = zip(*[(-1, -1) if d is None else (int(d[0]), int(d[1])) for d in decisions])
    return {"condition_level": torch.tensor(levels, dtype=torch.long),
            "condition_type": torch.tensor(types, dtype=torch.long)}


def _hinted(processor, messages: list[dict], plain: EncodedChat, hint, num_image_tokens: int, name: str) -> EncodedChat:
    """The :class:`~safevlm.data.chat.EncodedChat` of ``messages`` with the policy ``hint``
    inserted (what the language model reads), whose prompt mask holds exactly the tokens the
    head reads in ``plain`` (the same messages without the hint): the head never sees a hint,
    at inference the policy inserts it after the head has decided. The two token sequences are
    aligned; a ``ValueError`` names the record when the hint changes how the rest tokenises."""
    if not isinstance(hint, dict) or not isinstance(hint.get("text"), str) or not hint["text"].strip():
        raise ValueError(f"{name}: metadata[{POLICY_HINT_KEY!r}] must be {{'text': ..., 'position': ...}}, got {hint!r}")
    hinted = encode_chat(processor, insert_hint(messages, hint["text"], hint.get("position", "system")),
                         num_image_tokens, name=name)
    mask = [False] * len(hinted.input_ids)
    matcher = difflib.SequenceMatcher(None, plain.input_ids, hinted.input_ids, autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        mask[b:b + size] = [read and turn == -1 for read, turn in
                            zip(plain.prompt_mask[a:a + size], hinted.assistant_turn[b:b + size])]
    read = sorted(t for t, m in zip(hinted.input_ids, mask) if m)
    if read != sorted(t for t, m in zip(plain.input_ids, plain.prompt_mask) if m):
        raise ValueError(f"{name}: with the policy hint inserted the conversation tokenises differently, so the "
                         "head cannot read the same tokens as without it")
    return EncodedChat(hinted.input_ids, hinted.assistant_turn, mask)


class SafetyCollator:
    """Collate :class:`SafetyRecord` s into a LLaVA training batch with risk labels.

    Args:
        processor: the base's processor (``AutoProcessor.from_pretrained``: ``LlavaProcessor``,
            ``LlavaNextProcessor``...), called on the images to get their tensors and how many
            image tokens each takes; ``tokenizer``, ``apply_chat_template`` and ``image_token``
            render the text. Needs a fast tokenizer.
        max_length: cap on text + image tokens + ``num_prefix_tokens`` per sample (None: no cap).
        num_prefix_tokens: prefix safety tokens the model will insert (counted, not inserted).
        image_root: folder that records' relative image paths are resolved against.
        train_on: ``"assistant"`` (every assistant turn) or ``"last_assistant"``; either way the
            head reads no assistant turn (``prompt_mask``).
        system: optional system message put before every conversation.

    ``__call__(records)`` returns a dict of tensors:

    * ``input_ids``, ``attention_mask``, ``labels``: ``(B, L)`` long; padding on the tokenizer's
      ``padding_side``; labels are ``-100`` outside assistant turns and on padding;
    * ``prompt_mask``: ``(B, L)`` bool, the tokens the safety head reads: outside every
      assistant turn, not an image placeholder, not padding (what guarded generation gives the
      head for the same conversation);
    * ``pixel_values``: ``(N_img, 3, H, W)`` float, one per record that has an image, in batch
      order (absent when no record in the batch has an image); anyres families:
      ``(N_img, tiles, 3, H, W)`` and the processor's other image tensors beside it
      (``image_sizes`` ``(N_img, 2)``);
    * ``risk_level``, ``risk_type``: ``(B,)`` long;
    * ``condition_level``, ``condition_type``: ``(B,)`` long, only in a batch holding a decision
      swap (:func:`decision_tensors`).
    """

    def __init__(
        self,
        processor,
        max_length: int | None = None,
        num_prefix_tokens: int = 0,
        image_root: "str | os.PathLike | None" = None,
        train_on: str = "assistant",
        system: str | None = None,
    ):
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        if max_length is not None and max_length <= num_prefix_tokens:
            raise ValueError(f"max_length {max_length} leaves no room beside {num_prefix_tokens} prefix tokens")
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("processor has no tokenizer; pass a LlavaProcessor (AutoProcessor.from_pretrained)")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("SafetyCollator needs a fast tokenizer (it uses return_offsets_mapping)")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to tokenizer.unk_token)")
        self.processor = processor
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.num_prefix_tokens = num_prefix_tokens
        self.image_root = image_root
        self.train_on = train_on
        self.system = system
        self.image_token = image_token_of(processor)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {self.image_token!r} token")

    # ----------------------------------------------------------------- helpers

    def encode(self, record: SafetyRecord, num_image_tokens: int = 1) -> dict:
        """``input_ids``, ``labels`` and ``prompt_mask`` (lists) for one record;
        ``num_image_tokens`` per image."""
        messages = build_messages(record.turns, record.image is not None, self.system)
        name = f"record {record.id!r}"
        chat = encode_chat(self.processor, messages, num_image_tokens, name=name)
        hint = record.metadata.get(POLICY_HINT_KEY)
        if hint is not None:
            chat = _hinted(self.processor, messages, chat, hint, num_image_tokens, name)
        input_ids, prompt_mask = chat.input_ids, chat.prompt_mask
        trained = set(chat.assistant_turn) - {-1}
        if self.train_on == "last_assistant":
            trained = {max(trained)} if trained else set()
        labels = [t if turn in trained else IGNORE_INDEX for t, turn in zip(input_ids, chat.assistant_turn)]
        n_images = 1 if record.image is not None else 0
        found = sum(1 for t in input_ids if t == self.image_token_id)
        if found != n_images * num_image_tokens:
            raise ValueError(
                f"record {record.id!r}: {found} image tokens in the text but {n_images} image(s) x "
                f"{num_image_tokens} features; the prompt must not contain {self.image_token!r} itself"
            )
        if self.max_length is not None:
            budget = self.max_length - self.num_prefix_tokens
            if len(input_ids) > budget:
                last_image = max((k for k, t in enumerate(input_ids) if t == self.image_token_id), default=-1)
                if last_image >= budget:
                    raise ValueError(
                        f"record {record.id!r}: {last_image + 1} tokens up to the end of the image "
                        f"({num_image_tokens} image tokens) + {self.num_prefix_tokens} prefix tokens exceed "
                        f"max_length {self.max_length}; raise max_length or shorten the text before the image"
                    )
                input_ids, labels, prompt_mask = input_ids[:budget], labels[:budget], prompt_mask[:budget]
        return {"input_ids": input_ids, "labels": labels, "prompt_mask": prompt_mask}

    def token_length(self, record: SafetyRecord) -> int:
        """Token length of ``record`` with one placeholder per image: a sort key for grouping
        batches by length (each image adds the same number of features to every record)."""
        return len(self.encode(record, 1)["input_ids"])

    # ----------------------------------------------------------------- call

    def __call__(self, records: Sequence[SafetyRecord]) -> dict:
        import torch

        if not records:
            raise ValueError("cannot collate an empty batch")
        from safevlm.backbones import process_images

        images = [open_image(r, self.image_root) for r in records if r.image is not None]
        image_inputs = process_images(self.processor, images) if images else None
        counts = iter(image_inputs.num_tokens if image_inputs is not None else ())
        encoded = [self.encode(r, next(counts) if r.image is not None else 1) for r in records]
        length = max(len(e["input_ids"]) for e in encoded)
        pad_id = self.tokenizer.pad_token_id
        left = self.tokenizer.padding_side == "left"
        input_ids = torch.full((len(records), length), pad_id, dtype=torch.long)
        labels = torch.full((len(records), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(records), length), dtype=torch.long)
        prompt_mask = torch.zeros((len(records), length), dtype=torch.bool)
        for b, e in enumerate(encoded):
            n = len(e["input_ids"])
            cols = slice(length - n, length) if left else slice(0, n)
            input_ids[b, cols] = torch.tensor(e["input_ids"], dtype=torch.long)
            labels[b, cols] = torch.tensor(e["labels"], dtype=torch.long)
            prompt_mask[b, cols] = torch.tensor(e["prompt_mask"], dtype=torch.bool)
            attention_mask[b, cols] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "prompt_mask": prompt_mask,
            "risk_level": torch.tensor([r.risk_level for r in records], dtype=torch.long),
            "risk_type": torch.tensor([r.risk_type for r in records], dtype=torch.long),
        }
        batch.update(decision_tensors(records))
        if image_inputs is not None:
            batch.update(image_inputs.tensors)  # pixel_values (+ image_sizes, ...)
        return batch


__all__ = ["IGNORE_INDEX", "POLICY_HINT_KEY", "PREFIX_DECISION_KEY", "SafetyCollator", "TRAIN_ON", "decision_tensors"]
