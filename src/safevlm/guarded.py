"""Guarded generation: classify with the safety head, apply the policy, generate — one vision pass.

For a batch of (image, prompt) pairs::

    V = vision_tower(images)                       # once, shared by everything below
    risk = safety head(V, prompt tokens)            # the LLM does not run
    decision = policy(risk)                         # allow / hint / refuse per sample
    refuse -> the policy's refusal text             # never reaches the LLM
    hint   -> the hint goes into the chat (system message or user turn), re-tokenised
    allow, hint -> ONE generate call over those samples, reusing V

``generate_guarded`` returns a :class:`GuardedResult` per input; ``classify`` stops after
the policy (guard mode). Prompts are a string (one user turn with the image) or a list of
chat messages (``{"role", "content"}``, content a string or parts ``{"type": "text"|"image"}``),
rendered with the processor's chat template.

Conversations go through :mod:`safevlm.data.chat`, the code the training collator uses, so
the model reads a conversation as it did in training. In a multi-turn conversation the safety
head reads the image and **every user turn** (with the system text and the template's role
markers), never the assistant turns: a risky request in the second turn is judged as it
would be in the first, and a request made earlier stays in view on later turns (see
``safevlm.data.chat`` and ``docs/policy.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from safevlm.data.chat import EncodedChat, build_messages, encode_chat, insert_hint, render_chat
from safevlm.policy import Decision, Policy, PolicyOverrides, load_policy

logger = logging.getLogger("safevlm.guarded")

DEFAULT_MAX_NEW_TOKENS = 64


class InputTooLong(ValueError):
    """A prompt plus prefix tokens plus new tokens does not fit the language model's context."""


@dataclass
class GuardedResult:
    """One input's outcome. ``text`` is the answer (the refusal text when ``action`` is
    ``refuse``); ``risk_level`` (id) and ``risk_type`` (name) are the head's most probable
    ones; ``hint`` is the hint inserted (or None); ``decided_by`` the type whose rule chose
    the action. Token counts include the image tokens and, for the prompt, the hint."""

    text: str
    action: str
    risk_level: int
    risk_type: str
    level_probs: list[float]
    type_probs: dict[str, float]
    hint: str | None = None
    decided_by: str | None = None
    score: float | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    decision: Decision | None = field(default=None, repr=False)

    def to_dict(self, ndigits: int = 4) -> dict:
        d = self.decision.to_dict(ndigits) if self.decision is not None else {}
        return {
            "text": self.text,
            "action": self.action,
            "risk_level": self.risk_level,
            "risk_type": self.risk_type,
            "decided_by": self.decided_by,
            "score": d.get("score", self.score),
            "hint_level": d.get("hint_level"),
            "hint": self.hint,
            "level_probs": d.get("level_probs", self.level_probs),
            "type_probs": d.get("type_probs", self.type_probs),
            "error": self.error,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
        }

    @classmethod
    def from_decision(cls, decision: Decision, text: str, prompt_tokens: int = 0, completion_tokens: int = 0,
                      finish_reason: str | None = None):
        if finish_reason is None:
            finish_reason = "refused" if decision.action == "refuse" else "stop"
        return cls(
            text=text,
            action=decision.action,
            risk_level=decision.risk_level,
            risk_type=decision.risk_type,
            level_probs=list(decision.level_probs),
            type_probs=dict(decision.type_probs),
            hint=decision.hint,
            decided_by=decision.decided_by,
            score=decision.score,
            error=decision.error,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=finish_reason,
            decision=decision,
        )


# -- chat messages ------------------------------------------------------------------------------------
# build_messages (prompt string or message list -> HF multimodal messages) and insert_hint are
# safevlm.data.chat's, the ones the training collator uses.


def render(processor, messages: list[dict]) -> str:
    """The prompt text the model reads for ``messages``: the processor's chat template with the
    generation prompt, EOS after each earlier answer where the template lacks it (as in training)."""
    return render_chat(processor, messages, add_generation_prompt=True).text


# -- tensors ------------------------------------------------------------------------------------------------
def _device(model) -> torch.device:
    return model.device  # SafeVLM.device: also there when the model was loaded guard-only


def encode(model, processor, messages: list[dict], num_image_tokens: int | None = None) -> EncodedChat:
    """One conversation as the model reads it (generation prompt on, the image placeholder
    expanded to ``num_image_tokens``, by default the model's number of image features; bases
    whose images differ in size pass each image's count from
    ``model.backbone.image_inputs``): :func:`safevlm.data.chat.encode_chat`."""
    if num_image_tokens is None:
        num_image_tokens = model.config.num_image_features
    return encode_chat(processor, messages, num_image_tokens, add_generation_prompt=True)


def pad_left(model, processor, encoded: Sequence[EncodedChat]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids (B, L) long, attention_mask (B, L) long and prompt_mask (B, L) bool (the tokens
    the safety head reads), left-padded, on the model's device."""
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    length = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    prompt_mask = torch.zeros((len(encoded), length), dtype=torch.bool)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        input_ids[row, length - n :] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[row, length - n :] = 1
        prompt_mask[row, length - n :] = torch.tensor(e.prompt_mask, dtype=torch.bool)
    device = _device(model)
    return input_ids.to(device), attention_mask.to(device), prompt_mask.to(device)


# -- the guarded batch -------------------------------------------------------------------------------------
def _normalise(images, prompts) -> tuple[list, list]:
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)):
        prompts = [prompts]
    prompts = list(prompts)
    images = [images] if images is None or not isinstance(images, (list, tuple)) else list(images)
    if len(images) == 1 and images[0] is None and len(prompts) > 1:
        images = images * len(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; pass one image (or None) per prompt")
    return images, prompts


class _Batch:
    """The shared first half of guarded generation: messages, one vision pass, guard, policy."""

    def __init__(self, model, processor, images, prompts, policy, overrides, allow_no_prompt=False):
        self.model, self.processor, self.policy = model, processor, policy
        self.images, self.prompts = _normalise(images, prompts)
        n = len(self.prompts)
        if n == 0:
            raise ValueError("no inputs")
        tax = model.config.taxonomy
        if policy.taxonomy != tax:
            raise ValueError(
                f"the policy's taxonomy {list(policy.taxonomy.type_names)} differs from the model's {list(tax.type_names)}"
            )
        self.overrides = overrides if isinstance(overrides, (list, tuple)) else [overrides] * n
        if len(self.overrides) != n:
            raise ValueError(f"got {len(self.overrides)} overrides for {n} inputs")
        for ov in self.overrides:  # a request asking for more than the deployment allows fails before any work
            policy.check_overrides(ov)
        image_idx = [i for i, im in enumerate(self.images) if im is not None]
        self.vision_row = {i: r for r, i in enumerate(image_idx)}
        # the processor's tensors (pixel_values and the family's image_input_keys: image_sizes,
        # image_grid_thw...) and each image's token count (anyres / dynamic bases: per image size)
        images = [self.images[i] for i in image_idx]
        image_inputs = model.backbone.image_inputs(processor, images) if image_idx else None
        self.image_tokens = [None if im is None else image_inputs.num_tokens[self.vision_row[i]]
                             for i, im in enumerate(self.images)]
        self.messages: list[list[dict] | None] = []
        self.encoded: list[EncodedChat | None] = []  # the tokens the head (and, if unhinted, the LLM) reads
        for image, prompt, image_tokens in zip(self.images, self.prompts, self.image_tokens):
            if prompt is None:
                if not allow_no_prompt or image is None:
                    raise ValueError("each input needs a prompt" if not allow_no_prompt else "an input needs an image or a prompt")
                self.messages.append(None)
                self.encoded.append(None)
                continue
            messages = build_messages(prompt, image is not None)
            self.messages.append(messages)
            self.encoded.append(encode(model, processor, messages, image_tokens or 1))
        # groups that can share one head / generate call: the head needs one image per sample
        # or none, and a sample without a prompt reads the image alone
        self.groups: dict[str, list[int]] = {}
        for i, (image, encoded) in enumerate(zip(self.images, self.encoded)):
            key = "image" if image is not None and encoded is not None else ("image_only" if encoded is None else "text")
            self.groups.setdefault(key, []).append(i)
        self.vision_features = None
        if image_inputs is not None:
            self.vision_features = model.encode_images(**image_inputs.to(_device(model)).tensors)  # the one vision pass
        self.decisions: list[Decision | None] = [None] * n
        self.safety_states: list = [None] * n  # the head's safety_state per input, reused by generate
        self.prompt_tokens = [0] * n
        self.tokens: dict[str, tuple] = {}  # group -> (input_ids, attention_mask) the head read
        for key, idx in self.groups.items():
            self._guard(key, idx)

    def features(self, idx: list[int]):
        if self.vision_features is None or self.images[idx[0]] is None:
            return None
        rows = torch.tensor([self.vision_row[i] for i in idx], device=self.vision_features.device)
        return self.vision_features.index_select(0, rows)

    def _guard(self, key: str, idx: list[int]) -> None:
        features = self.features(idx)
        if key == "image_only":
            input_ids = attention_mask = prompt_mask = None
        else:
            encoded = [self.encoded[i] for i in idx]
            input_ids, attention_mask, prompt_mask = pad_left(self.model, self.processor, encoded)
            self.tokens[key] = (input_ids, attention_mask)
            for row, i in enumerate(idx):
                self.prompt_tokens[i] = int(attention_mask[row].sum())
        try:
            out = self.model.guard(input_ids, attention_mask=attention_mask, vision_features=features,
                                   prompt_mask=prompt_mask)
            level_probs, type_probs = out.level_probs, out.type_probs
            state = getattr(out, "safety_state", None)
            if state is not None:
                for row, i in enumerate(idx):
                    self.safety_states[i] = state[row]
        except Exception as err:  # fail closed: a broken head must not let input through
            logger.exception("safety head failed on %d input(s)", len(idx))
            for i in idx:
                self.decisions[i] = self.policy.error_decision(f"safety head raised {type(err).__name__}: {err}")
            return
        decisions = self.policy.decide_batch(level_probs, type_probs, [self.overrides[i] for i in idx])
        for i, decision in zip(idx, decisions):
            self.decisions[i] = decision


def classify(
    model,
    processor,
    images,
    prompts=None,
    policy: Policy | str | None = None,
    overrides: PolicyOverrides | Sequence[PolicyOverrides | None] | None = None,
) -> list[Decision]:
    """Guard mode: one vision pass, the safety head and the policy; the LLM never runs.

    ``images``: one PIL image (or None) per input; ``prompts``: strings, message lists or None
    (None reads the image alone).
    """
    policy = load_policy(policy)
    if prompts is None:
        prompts = [None] * (len(images) if isinstance(images, (list, tuple)) else 1)
    with torch.inference_mode():
        batch = _Batch(model, processor, images, prompts, policy, overrides, allow_no_prompt=True)
    return list(batch.decisions)


def generate_guarded(
    model,
    processor,
    images,
    prompts,
    policy: Policy | str | None = None,
    overrides: PolicyOverrides | Sequence[PolicyOverrides | None] | None = None,
    on_decisions: Callable[[list[Decision]], Any] | None = None,
    **generation_kwargs,
) -> list[GuardedResult]:
    """Classify, apply ``policy`` and generate, with one vision pass per image.

    Args:
        model: a :class:`~safevlm.model.SafeVLM`.
        processor: its processor (tokenizer with chat template + image processor).
        images: a PIL image, or a list with one image (or None for text only) per prompt.
        prompts: a string, a list of strings, or chat message lists (one image part each).
        policy: a :class:`Policy`, a shipped policy name or a YAML path (default: ``default``).
        overrides: per-request relaxations, one for all or one per input.
        on_decisions: called with every input's :class:`Decision` before the LLM runs.
        generation_kwargs: passed to ``generate`` (``max_new_tokens`` defaults to 64).

    Returns one :class:`GuardedResult` per input, in order. Refused inputs get the policy's
    refusal text and never reach the language model; the others are generated together in
    one call per group (inputs with an image, inputs without).
    """
    policy = load_policy(policy)
    tokenizer = processor.tokenizer
    if "max_length" not in generation_kwargs:
        generation_kwargs.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generation_kwargs.setdefault("pad_token_id", pad_id)
    with torch.inference_mode():
        batch = _Batch(model, processor, images, prompts, policy, overrides)
        if on_decisions is not None:
            on_decisions(list(batch.decisions))
        results: list[GuardedResult | None] = [None] * len(batch.decisions)
        for i, decision in enumerate(batch.decisions):
            if decision.action == "refuse":
                results[i] = GuardedResult.from_decision(decision, decision.refusal, batch.prompt_tokens[i], 0)
        for key, idx in batch.groups.items():
            keep = [i for i in idx if batch.decisions[i].action != "refuse"]
            if keep:
                reuse = keep == idx and all(batch.decisions[i].action == "allow" for i in keep)
                _generate(batch, keep, results, generation_kwargs, batch.tokens.get(key) if reuse else None)
    return results


def _generate(batch: _Batch, keep: list[int], results: list, generation_kwargs: dict, tokens=None) -> None:
    """One generate call over the samples ``keep`` (hinted prompts re-rendered), reusing
    their vision features (and the head's tokens when nothing changed); fills ``results``."""
    model, processor, policy = batch.model, batch.processor, batch.policy
    if tokens is None:
        encoded = []
        for i in keep:
            decision = batch.decisions[i]
            if decision.action == "hint":
                hinted = insert_hint(batch.messages[i], decision.hint, policy.hint_position)
                encoded.append(encode(model, processor, hinted, batch.image_tokens[i] or 1))
            else:
                encoded.append(batch.encoded[i])
        tokens = pad_left(model, processor, encoded)[:2]
    input_ids, attention_mask = tokens
    _check_context(model, input_ids, attention_mask, keep, generation_kwargs)
    features = batch.features(keep)
    states = [batch.safety_states[i] for i in keep]
    if all(state is not None for state in states):
        # the head already read these inputs: its state conditions the prefix tokens (no second head pass)
        generation_kwargs = {**generation_kwargs, "safety_state": torch.stack(states)}
    new_tokens = model.generate(input_ids, attention_mask=attention_mask, vision_features=features, **generation_kwargs)
    tokenizer = processor.tokenizer
    eos = _eos_ids(model, tokenizer, generation_kwargs)
    pad = generation_kwargs.get("pad_token_id")
    for row, i in enumerate(keep):
        tokens = new_tokens[row].tolist()
        n, finish = len(tokens), "length"
        for j, t in enumerate(tokens):
            if t in eos:
                n, finish = j + 1, "stop"
                break
        if finish == "length" and n < generation_kwargs.get("max_new_tokens", n + 1):
            finish = "stop"  # ended early (a stopping criterion); trailing padding is not output
            while n and tokens[n - 1] == pad:
                n -= 1
        text = tokenizer.decode(tokens[:n], skip_special_tokens=True).strip()
        results[i] = GuardedResult.from_decision(batch.decisions[i], text, int(attention_mask[row].sum()), n, finish)


def _eos_ids(model, tokenizer, generation_kwargs) -> set[int]:
    eos = generation_kwargs.get("eos_token_id")
    if eos is None:
        eos = getattr(model.base_model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


def _check_context(model, input_ids, attention_mask, keep, generation_kwargs) -> None:
    text_config = getattr(model.backbone.config, "text_config", None)
    limit = getattr(text_config, "max_position_embeddings", None)
    if not limit:
        return
    new = generation_kwargs.get("max_new_tokens") or 0
    prefix = model.config.num_prefix_tokens
    for row, i in enumerate(keep):
        length = int(attention_mask[row].sum())
        if length + prefix + new > limit:
            raise InputTooLong(
                f"input {i}: {length} prompt tokens + {prefix} prefix tokens + {new} new tokens "
                f"= {length + prefix + new} exceeds the model's context of {limit}"
            )


# -- multi-turn chat ---------------------------------------------------------------------------------------
class ChatSession:
    """A guarded multi-turn conversation about (at most) one image; every turn is classified
    and decided afresh over the whole conversation so far.

    The head reads the image and every user turn, never the assistant turns (see the module
    docstring), as it did in training. ``ask(prompt)`` returns the turn's
    :class:`GuardedResult`; refusals are kept in the history as the assistant's reply.
    ``set_image`` starts a new conversation (one image per conversation, as the safety head
    reads one image; it goes into the first user turn).
    """

    def __init__(self, model, processor, policy=None, image=None, overrides=None, **generation_kwargs):
        self.model, self.processor = model, processor
        self.policy = load_policy(policy)
        self.policy.check_overrides(overrides)
        self.overrides = overrides
        self.generation_kwargs = generation_kwargs
        self.image = image
        self.messages: list[dict] = []

    def reset(self) -> None:
        self.messages = []

    def set_image(self, image) -> None:
        self.image = image
        self.reset()

    def ask(self, prompt: str) -> GuardedResult:
        conversation = [*self.messages, {"role": "user", "content": prompt}]
        result = generate_guarded(
            self.model, self.processor, [self.image], [conversation], self.policy, self.overrides,
            **dict(self.generation_kwargs),
        )[0]
        answered = [*conversation, {"role": "assistant", "content": result.text}]
        self.messages = build_messages(answered, self.image is not None)
        return result


__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "ChatSession",
    "GuardedResult",
    "InputTooLong",
    "build_messages",
    "classify",
    "encode",
    "generate_guarded",
    "insert_hint",
    "pad_left",
    "render",
]
