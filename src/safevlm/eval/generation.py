"""The model side of an evaluation: three systems, one ``generate(requests)`` callable each.

* ``base``    — the base model alone: its own ``generate`` on the same chat prompt (the
  conversation rendered and tokenised as in :mod:`safevlm.data.chat`, the image through
  the same image processor). No safety module runs; no head output is stored.
* ``adapter`` — base + safety adapter, every input allowed: the safety head runs and its
  decision is stored, the prefix safety tokens (and the stage-2 LoRA) shape the answer,
  but no policy refuses or hints (:func:`allow_all_policy`).
* ``guarded`` — base + adapter + policy: :func:`safevlm.guarded.generate_guarded`, the
  serving path (one vision pass per batch, refusals never reach the LLM, hints inserted).

Each is a :class:`EvalSystem`: the callable the runner (:mod:`safevlm.eval.runner`)
calls with batches of :class:`~safevlm.eval.runner.GenerationRequest`, the run key, and
what goes into the manifest (decoding, seeds, device, dtype).

Decoding is greedy unless asked otherwise. Each batch is generated after
``torch.manual_seed(seed + crc32(first item id))``, so a sampled run gives the same
answers when it is resumed or repeated with the same batches. Images are opened with
:func:`safevlm.data.open_image`; an image that cannot be opened, or an input the model
rejects (too long for its context), fails that item alone (its error is stored and the
item is tried again on the next run), never the batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from safevlm.eval.runner import Generation, GenerationRequest
from safevlm.eval.store import RunKey

logger = logging.getLogger("safevlm.eval")

MODES: tuple[str, ...] = ("base", "adapter", "guarded")
ALLOW_ALL = "allow_all"
GREEDY: dict = {"do_sample": False}
_DECODING_KEYS = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                  "repetition_penalty", "num_beams")


def allow_all_policy(taxonomy=None):
    """The policy of the ``adapter`` system: the default policy with every risk type switched
    off, so the head's decision is recorded but every input is answered."""
    from safevlm.policy import DEFAULT_RULE, Policy, load_policy

    data = load_policy("default").to_dict()
    data["name"] = ALLOW_ALL
    data["description"] = "every risk type off: the safety head runs and is recorded, every input is answered"
    data["rules"] = {key: {**rule, "enabled": False} for key, rule in data["rules"].items()}
    data["rules"].setdefault(DEFAULT_RULE, {"enabled": False})
    data["relaxable_types"] = []
    return Policy.from_dict(data, source=ALLOW_ALL, taxonomy=taxonomy)


def check_decoding(decoding: dict | None) -> dict:
    """Decoding settings for ``generate``: greedy unless ``do_sample`` is set; unknown keys
    and impossible values are a ``ValueError`` naming them."""
    out = dict(GREEDY)
    for key, value in (decoding or {}).items():
        if key not in _DECODING_KEYS:
            raise ValueError(f"unknown decoding setting {key!r}; allowed: {', '.join(_DECODING_KEYS)}")
        if value is None:
            continue
        out[key] = value
    for key in ("max_new_tokens", "min_new_tokens", "num_beams", "top_k"):
        if key in out and (isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < (0 if key == "min_new_tokens" else 1)):
            raise ValueError(f"decoding setting {key} must be a positive integer, got {out[key]!r}")
    if "temperature" in out and not (isinstance(out["temperature"], (int, float)) and out["temperature"] >= 0):
        raise ValueError(f"decoding setting temperature must be >= 0, got {out['temperature']!r}")
    if out.get("temperature", 0) and out["temperature"] > 0 and "do_sample" not in (decoding or {}):
        out["do_sample"] = True
    if not out.get("do_sample"):
        for key in ("temperature", "top_p", "top_k"):
            out.pop(key, None)  # no sampling: these would only make generate warn
    return out


def _open(item):
    from safevlm.data import open_image

    if item.image is None:
        return None
    if isinstance(item.image, bytes):
        return open_image(item.image)
    return open_image(item.image, item.image_root or ".")


def _batch_seed(seed: int, requests: Sequence[GenerationRequest]) -> int:
    return (seed + zlib.crc32(requests[0].item.id.encode("utf-8"))) % (2**63)


class _Generator:
    """Shared by both generators: open images, group by decoding, seed, isolate failures."""

    def __init__(self, processor, decoding: dict | None = None, seed: int = 0):
        self.processor = processor
        self.decoding = check_decoding(decoding)  # what the manifest records
        self._explicit = {k: v for k, v in (decoding or {}).items() if v is not None}
        self.seed = int(seed)

    def settings(self, request: GenerationRequest) -> dict:
        """The ``generate`` keyword arguments for one request: the task's ``generation``
        settings, with the run's explicit decoding settings on top (greedy when neither samples)."""
        return check_decoding({**dict(request.generation), **self._explicit})

    def __call__(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        import torch

        out: list[Generation | None] = [None] * len(requests)
        images = [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                images[i] = _open(request.item)
            except (ValueError, OSError) as err:  # ImageError / a file that vanished: this item only
                out[i] = Generation(None, None, f"image: {err}")
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            if out[i] is None:
                groups.setdefault(json.dumps(self.settings(request), sort_keys=True), []).append(i)
        for key, idx in groups.items():
            kwargs = json.loads(key)
            torch.manual_seed(_batch_seed(self.seed, [requests[i] for i in idx]))
            try:
                results = self._generate([images[i] for i in idx], [requests[i].prompt for i in idx], kwargs)
            except (ValueError, RuntimeError) as err:
                if len(idx) == 1:
                    logger.warning("generation failed for item %s: %s", requests[idx[0]].item.id, err)
                    out[idx[0]] = Generation(None, None, f"{type(err).__name__}: {err}")
                    continue
                # find the input that fails: each alone (the others still get their answers)
                for i in idx:
                    out[i] = self([requests[i]])[0]
                continue
            for i, result in zip(idx, results):
                out[i] = result
        return out  # type: ignore[return-value]

    def _generate(self, images: list, prompts: list[str], kwargs: dict) -> list[Generation]:
        raise NotImplementedError


class BaseGenerator(_Generator):
    """The base model alone: ``base.generate`` on the chat prompt the guarded path renders
    (same messages, same template, same processor call: ``pixel_values`` and the family's
    other image inputs, each image's placeholder expanded as the processor does), left-padded,
    no safety modules.

    ``base``: a base of a supported family (``LlavaForConditionalGeneration``,
    ``LlavaNextForConditionalGeneration``...; or a peft model around one: its adapter is
    disabled while generating, so this is the base's own answer)."""

    def __init__(self, base, processor, decoding: dict | None = None, seed: int = 0):
        super().__init__(processor, decoding, seed)
        from safevlm.backbones import get_backbone

        self.backbone = get_backbone(base)
        self.base = base
        self.device = self.backbone.lm_head.weight.device

    def _generate(self, images: list, prompts: list[str], kwargs: dict) -> list[Generation]:
        import torch

        from safevlm.data.chat import build_messages, encode_chat

        tokenizer = self.processor.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out: list[Generation | None] = [None] * len(prompts)
        # inputs with an image and inputs without are two generate calls (as in generate_guarded)
        for with_image in (True, False):
            idx = [i for i, im in enumerate(images) if (im is not None) == with_image]
            if not idx:
                continue
            image_inputs = self.backbone.image_inputs(self.processor, [images[i] for i in idx]) if with_image else None
            counts = image_inputs.num_tokens if with_image else [1] * len(idx)
            encoded = [encode_chat(self.processor, build_messages(prompts[i], with_image), count,
                                   add_generation_prompt=True) for i, count in zip(idx, counts)]
            length = max(len(e.input_ids) for e in encoded)
            input_ids = torch.full((len(idx), length), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(idx), length), dtype=torch.long)
            for row, e in enumerate(encoded):
                input_ids[row, length - len(e.input_ids):] = torch.tensor(e.input_ids, dtype=torch.long)
                attention_mask[row, length - len(e.input_ids):] = 1
            inputs = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
            inputs.update(self.backbone.base_text_inputs(inputs["input_ids"]))  # Qwen2-VL on 5.x: token types
            if with_image:  # pixel_values and the family's image_input_keys (image_sizes, image_grid_thw...)
                dtype = next(self.base.parameters()).dtype
                inputs.update(image_inputs.to(self.device, dtype).tensors)
            disable = getattr(self.base, "disable_adapter", None)
            with torch.inference_mode(), (disable() if disable is not None else contextlib.nullcontext()):
                tokens = self.base.generate(**inputs, pad_token_id=pad_id, **kwargs)
            new = tokens[:, length:]
            for row, i in enumerate(idx):
                out[i] = Generation(tokenizer.decode(new[row], skip_special_tokens=True).strip())
        return out  # type: ignore[return-value]


class GuardedGenerator(_Generator):
    """Base + safety adapter + policy through :func:`safevlm.guarded.generate_guarded` (one
    vision pass per batch); each answer carries the head's output (``GuardedResult.to_dict()``
    without the text): action, risk level / type, level and type probabilities."""

    def __init__(self, model, processor, policy, decoding: dict | None = None, seed: int = 0):
        super().__init__(processor, decoding, seed)
        from safevlm.policy import load_policy

        self.model = model
        self.policy = load_policy(policy)

    def _generate(self, images: list, prompts: list[str], kwargs: dict) -> list[Generation]:
        from safevlm.guarded import generate_guarded

        results = generate_guarded(self.model, self.processor, images, prompts, self.policy, **kwargs)
        out = []
        for result in results:
            head = result.to_dict()
            text = head.pop("text")
            out.append(Generation(text, head))
        return out


@dataclass
class EvalSystem:
    """What answers an evaluation: ``mode`` (``base`` / ``adapter`` / ``guarded``), the
    ``generate`` callable, the labels of the model / adapter / policy (paths or names), the
    policy object (``None`` for the base), decoding settings and seed, and, for the modes
    with safety modules, the loaded ``model`` and ``processor`` (sweeps and calibration
    reuse them)."""

    mode: str
    generate: _Generator
    model_label: str
    adapter_label: str | None = None
    policy: object = None
    policy_label: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    model: object = None
    processor: object = None
    extra: dict = field(default_factory=dict)

    @property
    def decoding(self) -> dict:
        return dict(self.generate.decoding)

    @property
    def seed(self) -> int:
        return self.generate.seed

    @property
    def key(self) -> RunKey:
        """The results-store key: ``(model, adapter, policy)`` labels (``""`` for none; the
        ``adapter`` system's allow-all policy is ``""``)."""
        return RunKey(self.model_label, self.adapter_label or "", self.policy_label)

    def manifest(self, tasks: Sequence = (), judges: Sequence = ()) -> dict:
        """The run's ``manifest.json`` content (see :mod:`safevlm.eval.manifest`): the dtype
        goes with the decoding settings (a run resumed in another dtype is another run)."""
        from safevlm.eval.manifest import build_manifest

        from safevlm.eval.judges.base import stable_hash

        manifest = build_manifest(
            model=self.model_label, adapter=self.adapter_label, policy=None, tasks=tasks,
            decoding={**self.decoding, "dtype": self.dtype},
            seeds={"torch": self.seed, "per_batch": "seed + crc32(id of the batch's first item)"},
            judges=judges, extra={"mode": self.mode, "device": self.device, **self.extra},
        )
        if self.policy is not None:  # the resolved policy ('extends' merged), hashed as it acts
            manifest["policy"] = {"source": self.policy_label, "name": self.policy.name,
                                  "sha256": stable_hash(self.policy.to_dict())}
        return manifest


def _label(path) -> str:
    """A stable label for a model / adapter / policy path: absolute for local paths, as given otherwise."""
    text = str(path)
    return os.path.abspath(text) if os.path.exists(text) else text


def _dtype_name(model) -> str:
    return str(next(model.parameters()).dtype).replace("torch.", "")


def check_model_path(model) -> None:
    """``FileNotFoundError`` for a base that is neither a folder nor ``tiny:<preset>[@seed]``
    (what :func:`safevlm.loading.load_model_and_processor` refuses too)."""
    from safevlm.bases import parse_tiny_spec

    if parse_tiny_spec(model) is None and not os.path.isdir(str(model)):
        raise FileNotFoundError(f"model folder not found: {model}")


def load_system(model: str, adapter: "str | None" = None, policy: "str | None" = None, *, device=None,
                dtype="auto", decoding: dict | None = None, seed: int = 0, allow_base_mismatch: bool = False) -> EvalSystem:
    """Load the system to evaluate with the one loader (:mod:`safevlm.loading`).

    * no ``adapter``: the ``base`` system (a ``policy`` needs the safety head: ``ValueError``);
    * ``adapter``, no ``policy``: the ``adapter`` system (allow-all);
    * ``adapter`` and ``policy`` (a shipped name or a YAML path): the ``guarded`` system.
    """
    from safevlm.errors import UsageError
    from safevlm.bases import load_base
    from safevlm.loading import load_model_and_processor
    from safevlm.policy import load_policy

    check_decoding(decoding)  # bad settings fail before the model loads
    check_model_path(model)
    if adapter is None:
        if policy is not None:
            raise UsageError("--policy needs --adapter: a policy acts on the safety head's output, and the base alone has none")
        base, processor = load_base(model, dtype=dtype, device=device)
        generator = BaseGenerator(base, processor, decoding, seed)
        return EvalSystem("base", generator, _label(model), device=str(generator.device), dtype=_dtype_name(base),
                          processor=processor)
    policy_obj = load_policy(policy) if policy is not None else None  # a bad policy fails before the model loads
    safe_model, processor = load_model_and_processor(model, adapter, device=device, dtype=dtype,
                                                     allow_base_mismatch=allow_base_mismatch)
    return system_from_model(safe_model, processor, policy_obj, model_label=_label(model), adapter_label=_label(adapter),
                             policy_label=None if policy is None else _label(policy), decoding=decoding, seed=seed)


def system_from_model(model, processor, policy=None, *, model_label: str, adapter_label: str | None,
                      policy_label: str | None = None, decoding: dict | None = None, seed: int = 0) -> EvalSystem:
    """An ``adapter`` (``policy=None``) or ``guarded`` system around a loaded
    :class:`~safevlm.model.SafeVLM` (what the demo evaluates in memory)."""
    from safevlm.policy import load_policy

    if policy is None:
        generator = GuardedGenerator(model, processor, allow_all_policy(model.config.taxonomy), decoding, seed)
        mode, policy_obj, label = "adapter", None, ""
    else:
        policy_obj = load_policy(policy)
        generator = GuardedGenerator(model, processor, policy_obj, decoding, seed)
        mode = "guarded"
        label = policy_label or (str(policy) if isinstance(policy, (str, os.PathLike)) else policy_obj.name)
    device = str(model.backbone.lm_head.weight.device)
    return EvalSystem(mode, generator, model_label, adapter_label, policy_obj, label, device=device,
                      dtype=_dtype_name(model.backbone.model), model=model, processor=processor)


def base_system(base, processor, *, model_label: str, decoding: dict | None = None, seed: int = 0) -> EvalSystem:
    """The ``base`` system around a loaded base model (a peft model runs with its adapter disabled)."""
    generator = BaseGenerator(base, processor, decoding, seed)
    return EvalSystem("base", generator, model_label, device=str(generator.device), dtype=_dtype_name(base),
                      processor=processor)


__all__ = [
    "ALLOW_ALL",
    "BaseGenerator",
    "EvalSystem",
    "GuardedGenerator",
    "MODES",
    "allow_all_policy",
    "base_system",
    "check_decoding",
    "check_model_path",
    "load_system",
    "system_from_model",
]
