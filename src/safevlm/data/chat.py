"""Conversations as the model reads them: one implementation for training and for inference.

The collator (training) and guarded generation (inference) both turn a conversation into
tokens here, so the language model and the safety head read the same tokens in both:

* :func:`build_messages` — a prompt string, chat messages or a record's turns -> Hugging Face
  multimodal messages (the image part first in the first user turn unless the messages place it);
* :func:`render_chat` — the messages through the processor's chat template, with the
  character span of every assistant turn (EOS appended where the template does not end
  assistant turns with it, as in LLaVA's own training data);
* :func:`expand_image_tokens` — each image placeholder expanded to the image's tokens, exactly
  as the processor does (a string replace: ``LlavaProcessor`` repeats ``<image>``, Gemma 3's
  processor writes a block around its image tokens; :func:`safevlm.backbones.image_prompt`);
* :func:`encode_chat` — the three above, tokenised once with offsets: token ids, the
  assistant turn each token belongs to, and the **prompt mask**: the tokens the head reads.

What the safety head reads in a conversation
--------------------------------------------
The image (through its vision features) and every token of the conversation up to and
including the generation prompt of the answer being produced, **except the assistant turns**
and the image placeholders: the system text, every user turn, the template's role markers.

* Every user turn counts, the latest as much as the earlier ones (the head has no notion of
  position over the prompt), so a risky request stays in view on later turns: "please go on"
  after a refused request is judged with that request in it.
* Assistant turns are left out: in training they are the answers, whose wording would give the
  label away; at inference they are the model's own output, or text a client claims the
  model wrote, which must not be able to talk the head into "safe".
* A conversation is rendered the same way in both: when it ends with a user turn the
  generation prompt is added (inference, and records without an answer); when it ends with an
  assistant turn the text stops at the end of that turn (its EOS), so the template's trailing
  separator never becomes a token the head reads in training but never sees at inference.

Training labels follow from the same spans: a token is supervised when it lies inside a
trained assistant turn (see :class:`~safevlm.data.collator.SafetyCollator`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from safevlm.data.records import ROLES, Turn, strip_image_placeholder

DEFAULT_IMAGE_TOKEN = "<image>"


# -- messages ---------------------------------------------------------------------------------------------
def _text_part(text) -> dict:
    if not isinstance(text, str):
        raise ValueError(f"message text must be a string, got {type(text).__name__}")
    return {"type": "text", "text": strip_image_placeholder(text)}


def _parts(content, where: str) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [_text_part(content)]
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            parts.append({"type": "image"})
        elif kind == "text":
            parts.append(_text_part(part.get("text")))
        else:
            raise ValueError(f"{where} part {j}: expected {{'type': 'text' | 'image'}}, got {part!r}")
    return parts


def build_messages(
    conversation: str | Sequence[dict | Turn], has_image: bool, system: str | None = None
) -> list[dict]:
    """Hugging Face multimodal chat messages (``{"role", "content": [parts]}``) for a conversation.

    Args:
        conversation: a prompt string (one user turn), or a sequence of turns, each a
            :class:`~safevlm.data.Turn` or a ``{"role", "content"}`` dict whose content is a
            string or a list of parts (``{"type": "text", "text": ...}`` / ``{"type": "image"}``).
        has_image: whether an image comes with the conversation (the head reads one per input,
            or none).
        system: text of a system turn put before the conversation.

    Text is taken without ``<image>`` placeholders (LLaVA-style sources keep them in the text).
    When no message has an image part, the image (if any) goes first in the first user turn;
    otherwise the messages must hold exactly ``int(has_image)`` image parts.
    """
    if isinstance(conversation, str):
        conversation = [{"role": "user", "content": conversation}]
    messages: list[dict] = []
    if system:
        messages.append({"role": "system", "content": [_text_part(system)]})
    for i, turn in enumerate(conversation):
        if isinstance(turn, Turn):
            role, content = turn.role, turn.text
        elif isinstance(turn, dict) and "role" in turn:
            role, content = turn["role"], turn.get("content")
        else:
            raise ValueError(f"message {i}: expected a Turn or a {{'role', 'content'}} dict, got {turn!r}")
        if role not in ROLES:
            raise ValueError(f"message {i}: role must be one of {', '.join(ROLES)}, got {role!r}")
        messages.append({"role": role, "content": _parts(content, f"message {i}")})
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("a conversation needs at least one user message")
    n_images = sum(1 for m in messages for p in m["content"] if p["type"] == "image")
    if n_images == 0 and has_image:
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"].insert(0, {"type": "image"})
    elif n_images != int(has_image):
        raise ValueError(
            f"the conversation has {n_images} image part(s) but {int(has_image)} image was given; "
            "the safety head reads exactly one image per input (or none)"
        )
    return messages


# -- rendering ---------------------------------------------------------------------------------------------
@dataclass
class ChatText:
    """A rendered conversation: ``text`` and the ``[start, end)`` character span of each
    assistant turn (its end-of-turn token included)."""

    text: str
    assistant_spans: list[tuple[int, int]]


def _apply_template(processor, messages: list[dict], add_generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_chat(
    processor, messages: list[dict], add_generation_prompt: bool | None = None, name: str = "the conversation"
) -> ChatText:
    """Render ``messages`` with the processor's chat template and locate the assistant turns.

    ``add_generation_prompt`` (default: when the last message is not an assistant turn) ends the
    text with the template's generation prompt; a conversation that ends with an assistant turn
    and no generation prompt ends at that turn's end-of-turn token. Each assistant turn is
    found by rendering the prefix before it (with the generation prompt) and the prefix
    including it, so any template works without ``{% generation %}`` markers. Where the
    template does not end assistant turns with the tokenizer's EOS (llava-1.5-hf), EOS is
    appended to each, as in LLaVA's training data. ``name`` goes into error messages.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    if getattr(processor, "chat_template", None) is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the processor has no chat template; safevlm renders conversations with it")
    if not messages:
        raise ValueError(f"{name} has no messages")
    ends_with_answer = messages[-1]["role"] == "assistant"
    if add_generation_prompt is None:
        add_generation_prompt = not ends_with_answer
    full = _apply_template(processor, messages, add_generation_prompt)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            continue
        before = _apply_template(processor, messages[:i], True)
        upto = _apply_template(processor, messages[: i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ValueError(
                f"{name}: the chat template does not render conversation prefixes as prefixes "
                f"of the full text, so assistant turn {i} cannot be located"
            )
        answer = upto[len(before) :]
        spans.append((len(before), len(before) + len(answer.rstrip())))
    eos = getattr(tokenizer, "eos_token", None)
    if eos and spans:
        pieces, cursor, shift, fixed = [], 0, 0, []
        for start, end in spans:
            if full[start:end].endswith(eos):
                fixed.append((start + shift, end + shift))
                continue
            pieces += [full[cursor:end], eos]
            cursor = end
            fixed.append((start + shift, end + shift + len(eos)))
            shift += len(eos)
        full, spans = "".join(pieces) + full[cursor:], fixed
    if ends_with_answer and not add_generation_prompt and spans:
        full = full[: spans[-1][1]]  # nothing after the last answer: inference never has it
    return ChatText(full, spans)


def expand_image_tokens(
    chat: ChatText, image_token: str, num_image_tokens: int, expanded: str | None = None
) -> ChatText:
    """``chat`` with each placeholder ``image_token`` replaced by ``expanded`` (default: the
    token repeated ``num_image_tokens`` times, as ``LlavaProcessor`` does; Gemma 3: the block
    ``ImagePrompt.expand`` gives) and the assistant spans shifted to match."""
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    if expanded is None:
        expanded = image_token * num_image_tokens
    if expanded == image_token or image_token not in chat.text:
        return chat
    positions, start = [], chat.text.find(image_token)
    while start != -1:
        positions.append(start)
        start = chat.text.find(image_token, start + len(image_token))
    grow = len(expanded) - len(image_token)

    def shift(at: int) -> int:
        return at + grow * sum(p < at for p in positions)

    text = chat.text.replace(image_token, expanded)
    return ChatText(text, [(shift(s), shift(e)) for s, e in chat.assistant_spans])


# -- tokens ------------------------------------------------------------------------------------------------
@dataclass
class EncodedChat:
    """One tokenised conversation (lists of length L).

    ``assistant_turn[k]``: index of the assistant turn token k belongs to (0 = the first answer),
    -1 outside assistant turns. ``prompt_mask[k]``: True for the tokens the safety head reads
    (outside assistant turns, not an image placeholder).
    """

    input_ids: list[int]
    assistant_turn: list[int]
    prompt_mask: list[bool]


def image_token_of(processor) -> str:
    """The token that fills an image's positions in ``input_ids`` (``<image>`` for LLaVA,
    ``<image_soft_token>`` for Gemma 3): :func:`safevlm.backbones.image_prompt`."""
    from safevlm.backbones import image_prompt

    return image_prompt(processor).token


def insert_hint(messages: list[dict], hint: str, position: str) -> list[dict]:
    """A copy of ``messages`` with ``hint`` as (or appended to) the system message
    (``position="system"``) or appended to the last user turn (``"user"``)."""
    messages = copy.deepcopy(messages)
    if position == "system":
        if messages and messages[0]["role"] == "system":
            messages[0]["content"].append({"type": "text", "text": hint})
        else:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": hint}]})
        return messages
    if position == "user":
        for message in reversed(messages):
            if message["role"] == "user":
                texts = [p for p in message["content"] if p.get("type") == "text"]
                if texts:
                    texts[-1]["text"] = f"{texts[-1]['text']}\n{hint}"
                else:
                    message["content"].append({"type": "text", "text": hint})
                return messages
        raise ValueError("hint_position 'user' needs a user message in the conversation")
    raise ValueError(f"unknown hint position {position!r}; allowed: system, user")


def encode_chat(
    processor,
    messages: list[dict],
    num_image_tokens: int = 1,
    add_generation_prompt: bool | None = None,
    name: str = "the conversation",
) -> EncodedChat:
    """Render (:func:`render_chat`), expand the image placeholder to ``num_image_tokens``
    (:func:`expand_image_tokens`, by the processor's own rule: :func:`safevlm.backbones.image_prompt`)
    and tokenise once; BOS is added unless the template writes it.

    Conversations with assistant turns need a fast tokenizer (offsets locate the turns).
    """
    from safevlm.backbones import image_prompt

    tokenizer = processor.tokenizer
    prompt = image_prompt(processor)
    chat = expand_image_tokens(render_chat(processor, messages, add_generation_prompt, name), prompt.placeholder,
                               num_image_tokens, prompt.expand(num_image_tokens))
    bos = tokenizer.bos_token
    add_special = not (bos and chat.text.startswith(bos))
    spans = chat.assistant_spans
    if spans and not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{name} has assistant turns: locating them needs a fast tokenizer (offsets)")
    encoding = tokenizer(chat.text, add_special_tokens=add_special, return_offsets_mapping=bool(spans))
    input_ids = list(encoding["input_ids"])
    turn_of = [-1] * len(input_ids)
    if spans:
        for k, (start, end) in enumerate(encoding["offset_mapping"]):
            if end > start:
                turn_of[k] = next((t for t, (s, e) in enumerate(spans) if s <= start < e), -1)
    image_token_id = tokenizer.convert_tokens_to_ids(prompt.token)
    prompt_mask = [t == -1 and i != image_token_id for t, i in zip(turn_of, input_ids)]
    return EncodedChat(input_ids, turn_of, prompt_mask)


__all__ = [
    "ChatText",
    "DEFAULT_IMAGE_TOKEN",
    "EncodedChat",
    "build_messages",
    "encode_chat",
    "expand_image_tokens",
    "image_token_of",
    "insert_hint",
    "render_chat",
]
