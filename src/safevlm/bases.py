"""Base models: the dtype rule, ``tiny:`` specs, processors, LoRA, and fingerprints that bind
an adapter to its exact base.

This is the lower half of loading (below :mod:`safevlm.model`, which builds on it);
:mod:`safevlm.loading` is the public entry point and states the rules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from torch import nn

from safevlm.backbones import BACKBONES

logger = logging.getLogger("safevlm.loading")

DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_HELP = "Weights dtype (auto: float32 on CPU, bfloat16 on GPUs that support it, else float16)."

_TINY_RE = re.compile(r"^tiny:(?P<preset>[A-Za-z0-9_]+)(?:@(?P<seed>\d+))?$")


class BaseMismatchError(ValueError):
    """An adapter was trained on a base with other weights (its fingerprint differs)."""


# ------------------------------------------------------------------------------ names and rules
def parse_tiny_spec(spec) -> tuple[str, int] | None:
    """``"tiny:default@3"`` -> ``("default", 3)``; None for anything else."""
    match = _TINY_RE.match(str(spec or ""))
    if not match:
        return None
    return match.group("preset"), int(match.group("seed") or 0)


def resolve_dtype(dtype, device):
    """The dtype to load weights in on ``device``: THE meaning of ``"auto"`` in safevlm.

    ``None`` / ``"auto"``: float32 on CPU, bfloat16 on a CUDA GPU that supports it, float16
    on other GPUs and accelerators. A name from :data:`DTYPES` or a floating ``torch.dtype``
    is returned as that dtype. Raises :class:`~safevlm.errors.UsageError` for anything else.
    """
    import torch

    from safevlm.errors import UsageError

    if dtype is None or dtype == "auto":
        kind = torch.device(device if device is not None else "cpu").type
        if kind == "cpu":
            return torch.float32
        if kind == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return getattr(torch, dtype)
    raise UsageError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)} or a floating torch.dtype")


def _model_device(model):
    return model.get_input_embeddings().weight.device


# -------------------------------------------------------------------------------- fingerprint
# The base tensors a fingerprint samples, per model family, as name suffixes: they match the
# checkpoint keys of every layout (4.57's and 5.x's in memory, the hub's legacy names on disk).
# None of them is a LoRA target (LoRA goes on the language model's linear layers), so a merged
# model keeps its base's fingerprint.
FINGERPRINT_TENSORS = {model_type: cls.fingerprint_tensors for model_type, cls in BACKBONES.items()}  # from each family
FINGERPRINT_VERSION = "v1"
_SAMPLE_ROWS, _SAMPLE_COLUMNS = 16, 256
_RECORD_ATTR = "_safevlm_fingerprint"  # on a loaded base: (checkpoint fingerprint, in-memory fingerprint)


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), first and last included (all of them if n <= k)."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _architecture(config) -> dict:
    from safevlm.backbones import get_backbone_class

    facts = dict(get_backbone_class(config).config_facts(config))
    for part in ("text_config", "vision_config"):
        sub = getattr(config, part)
        for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "image_size", "patch_size"):
            value = getattr(sub, key, None)
            if value is not None:
                facts[f"{part}.{key}"] = value
    return facts


def _find(names, suffix: str) -> str | None:
    found = [n for n in names if n == suffix or n.endswith("." + suffix)]
    return found[0] if len(found) == 1 else None


def _digest(config, pieces) -> str:
    """Hash of the architecture facts and, per tensor, its shape and a strided sample.

    ``pieces``: (suffix, shape, row(i) -> that row as a CPU tensor). Sampled values are cast
    to float32 and rounded to bfloat16 precision, so a checkpoint gives the same fingerprint
    loaded in float32 or bfloat16 (and any load of a float16 or bfloat16 checkpoint does).
    """
    import torch

    h = hashlib.sha256(json.dumps(_architecture(config), sort_keys=True, default=str).encode())
    for suffix, shape, row in pieces:
        width = 1
        for n in shape[1:]:
            width *= int(n)
        columns = torch.tensor(_spread(width, _SAMPLE_COLUMNS))
        sample = torch.stack([row(i).reshape(-1).float()[columns] for i in _spread(int(shape[0]), _SAMPLE_ROWS)])
        h.update(f"{suffix}{list(shape)}".encode())
        h.update(sample.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return f"{FINGERPRINT_VERSION}:{h.hexdigest()[:16]}"


def _memory_fingerprint(model) -> str | None:
    """Fingerprint of the weights in memory; None when a sampled tensor is not readable
    (offloaded to the meta device, sharded by FSDP / ZeRO-3, or missing)."""
    config = model.config
    suffixes = FINGERPRINT_TENSORS.get(getattr(config, "model_type", None))
    if suffixes is None:
        return None
    params = {name.replace(".base_layer.", "."): p for name, p in model.named_parameters()}
    pieces = []
    for suffix in suffixes:
        name = _find(params, suffix)
        if name is None:
            return None
        tensor = params[name].detach()
        if tensor.device.type == "meta" or tensor.dim() < 2 or tensor.numel() == 0:
            return None
        pieces.append((suffix, tuple(tensor.shape), lambda i, t=tensor: t[i].cpu()))
    return _digest(config, pieces)


def _weight_files(folder: Path) -> dict[str, Path] | None:
    """{tensor name: safetensors file} of a model folder (sharded or not); None without one."""
    from safetensors import safe_open

    index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
    if index.is_file():
        return {key: folder / name for key, name in json.loads(index.read_text())["weight_map"].items()}
    if single.is_file():
        with safe_open(str(single), "pt") as f:
            return {key: single for key in f.keys()}
    return None


def folder_fingerprint(path: str | os.PathLike, config=None) -> str | None:
    """Fingerprint of a base folder's weights as stored, reading only the sampled rows of
    the sampled tensors (``model.safetensors``, or shards through
    ``model.safetensors.index.json``). None when the folder has no safetensors weights."""
    from safetensors import safe_open

    folder = Path(path)
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder))
    suffixes = FINGERPRINT_TENSORS.get(getattr(config, "model_type", None))
    files = _weight_files(folder)
    if suffixes is None or files is None:
        return None
    pieces = []
    for suffix in suffixes:
        key = _find(files, suffix)
        if key is None:
            return None
        with safe_open(str(files[key]), "pt") as f:
            sliced = f.get_slice(key)
            shape = tuple(sliced.get_shape())
            rows = {i: sliced[i:i + 1][0] for i in _spread(shape[0], _SAMPLE_ROWS)}
        pieces.append((suffix, shape, rows.__getitem__))
    return _digest(config, pieces)


def _record_fingerprint(model, checkpoint_fingerprint: str | None) -> None:
    """Remember the checkpoint's fingerprint on a freshly loaded base, with the in-memory one
    it has now: while the weights stay as loaded, :func:`base_fingerprint` returns the
    checkpoint's, whatever dtype the base was loaded in."""
    if checkpoint_fingerprint is not None:
        setattr(model, _RECORD_ATTR, (checkpoint_fingerprint, _memory_fingerprint(model)))


def base_fingerprint(model) -> str | None:
    """A short hash (``"v1:3f2a..."``) that identifies a base model's weights.

    It covers the architecture facts of the base config and strided samples (16 rows x 256
    values) of the token embedding table, the vision tower's patch embedding and the base
    projector's first layer, rounded to bfloat16 precision: a few thousand values, cheap on a
    7B model. The same weights give the same fingerprint in float32 and bfloat16; a base
    loaded through this module keeps its checkpoint's fingerprint in any dtype (float16
    included) while its weights stay as loaded. ``model``: a base or a peft model around
    one. None when the weights cannot be read.
    """
    from safevlm.backbones import get_backbone

    inner = get_backbone(model).model
    now = _memory_fingerprint(inner)
    recorded = getattr(inner, _RECORD_ATTR, None)
    if recorded is not None and (now is None or now == recorded[1]):
        return recorded[0]
    return now


def check_adapter_base(config, base_config, fingerprint: str | None, adapter_dir,
                       allow_base_mismatch: bool = False, warn: bool = True) -> None:
    """Refuse an adapter made for another base: shapes first, then the fingerprint.

    ``config``: the adapter's SafetyConfig; ``base_config`` and ``fingerprint``: the base's.
    Raises ValueError for other shapes (always) and :class:`BaseMismatchError` for other
    weights (a warning instead with ``allow_base_mismatch``). ``warn=False`` checks only.
    """
    check_base_signature(config, base_config, source=f"adapter {adapter_dir}")
    expected = config.base_fingerprint
    if expected is None or fingerprint is None or expected.split(":")[0] != fingerprint.split(":")[0]:
        if warn:
            why = ("has no base fingerprint (saved before safevlm recorded them, or from a base whose "
                   "weights could not be read)" if expected is None
                   else "has a base fingerprint of another scheme" if fingerprint is not None
                   else "was given a base whose weights cannot be read for a fingerprint")
            logger.warning("adapter %s %s: cannot check that it was trained on this base", adapter_dir, why)
        return
    if expected == fingerprint:
        return
    message = (f"adapter {adapter_dir} was trained on a base with fingerprint {expected}, but this base has "
               f"fingerprint {fingerprint}: same shapes, other weights, so its decisions would be meaningless")
    if not allow_base_mismatch:
        raise BaseMismatchError(
            f"{message}. Load the base it was trained on, or pass allow_base_mismatch=True "
            "(--allow-base-mismatch; recipe key model.allow_base_mismatch) to load it anyway"
        )
    if warn:
        logger.warning("%s; loading it anyway (allow_base_mismatch)", message)


def check_base_signature(config, base_config, source: str) -> None:
    """Refuse safety modules made for a base of another shape, naming every difference."""
    from safevlm.config import SafetyConfig

    expected = SafetyConfig.from_base_config(base_config).base_signature()
    got = config.base_signature()
    if got["base_model_type"] != expected["base_model_type"]:
        def name(model_type):
            cls = BACKBONES.get(model_type)
            return f"{model_type} ({cls.model_class_name})" if cls else repr(model_type)

        raise ValueError(
            f"{source} was made for a {name(got['base_model_type'])} base, but this base is "
            f"{name(expected['base_model_type'])}: safety modules do not carry over between model "
            "families; train an adapter on this base"
        )
    if got != expected:
        diff = ", ".join(f"{k}: {got[k]} here vs {expected[k]} in the base" for k in got if got[k] != expected[k])
        raise ValueError(f"{source} was made for a base of another shape ({diff})")


# ---------------------------------------------------------------------------- guard-only bases
# `SafeVLM.guard` reads two parts of a base: the vision tower (once per image) and the token
# embedding table (the prompt tokens the head attends over). The base projector, the language
# model's decoder layers, its final norm and the LM head are never read by guard (the safety
# projector takes the vision features directly), so a guard-only base leaves them out.

# Checkpoint names, rewritten to one canonical name: (pattern, replacement) applied in order to
# a tensor's name on disk, in memory and in a peft adapter. The LLaVA-style families share one
# set: the hub's layout (`language_model.model.*`, `vision_tower.vision_model.*`,
# `image_newline`), 4.57's in-memory one (`model.vision_tower.vision_model.*`) and 5.x's
# (`model.vision_tower.*`) meet on `language_model.*` / `vision_tower.*`. The Qwen families'
# hub layout (`model.layers.*`, `model.embed_tokens.*`, `visual.*`, also what both lines write)
# and their in-memory one (`model.language_model.*`, `model.visual.*`) meet on
# `language_model.*` / `visual.*`.
_LLAVA_STYLE_ALIASES = (
    (r"^base_model\.model\.", ""),
    (r"^model\.", ""),
    (r"^language_model\.model\.", "language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^vision_tower\.vision_model\.", "vision_tower."),
)
_QWEN_STYLE_ALIASES = (
    (r"^base_model\.model\.", ""),
    (r"^model\.language_model\.", "language_model."),
    (r"^model\.visual\.", "visual."),
    (r"^model\.", "language_model."),
)
CHECKPOINT_ALIASES = {
    model_type: _QWEN_STYLE_ALIASES if model_type in ("qwen2_vl", "qwen2_5_vl") else _LLAVA_STYLE_ALIASES
    for model_type in BACKBONES
}
_GUARD_ONLY_ATTR = "_safevlm_guard_only"  # on a guard-only base: True


class GuardOnlyError(RuntimeError):
    """A model loaded guard-only was asked for something that needs its language model."""


class DroppedModule(nn.Module):
    """Stands where a guard-only load left a part of the base out: it holds no parameters, and
    calling it (or reading a weight from it) says so."""

    def __init__(self, name: str):
        super().__init__()
        self.dropped_name = name

    def _message(self) -> str:
        return (f"{self.dropped_name} was not loaded: this base was loaded guard-only (guard_only=True), "
                "which keeps only the vision tower and the token embeddings; load it without "
                "guard_only to run the language model")

    def forward(self, *args, **kwargs):
        raise GuardOnlyError(self._message())

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            raise AttributeError(f"{name!r}: {self._message()}") from None

    def extra_repr(self) -> str:
        return f"dropped: {self.dropped_name}"


def is_guard_only(model) -> bool:
    """True for a base (or a peft model around one) loaded guard-only."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(inner, _GUARD_ONLY_ATTR, False))


def guard_modules(model) -> dict:
    """The parts of a base that guard reads: ``{"vision_tower": module, "token_embeddings": module}``."""
    from safevlm.backbones import get_backbone

    backbone = get_backbone(model)
    return {"vision_tower": backbone.vision_tower, "token_embeddings": backbone.model.get_input_embeddings()}


def drop_language_model(model):
    """Make ``model`` (a base, in place) guard-only: every submodule that holds none of
    :func:`guard_modules` is replaced by a parameterless :class:`DroppedModule`, which raises
    :class:`GuardOnlyError` when called. For LLaVA that is the base projector, the decoder
    layers, the final norm, the rotary embedding and the LM head. Returns ``model``."""
    keep = {id(m) for m in guard_modules(model).values()}
    # qualified names of the kept modules and of every module above one of them
    above = set()
    for name, module in model.named_modules():
        if id(module) in keep:
            parts = name.split(".")
            above.update(".".join(parts[:i]) for i in range(len(parts) + 1))

    def prune(module, prefix):
        for child_name, child in list(module.named_children()):
            name = f"{prefix}{child_name}"
            if id(child) in keep:
                continue
            if name in above:
                prune(child, name + ".")
            else:
                setattr(module, child_name, DroppedModule(name))

    prune(model, "")
    setattr(model, _GUARD_ONLY_ATTR, True)
    return model


def canonical_name(model_type: str | None, name: str) -> str:
    """A tensor's name with the family's :data:`CHECKPOINT_ALIASES` applied: the same for its
    checkpoint key on disk (any layout), its parameter name in memory and its peft key."""
    for pattern, replacement in CHECKPOINT_ALIASES.get(model_type, ()):
        name = re.sub(pattern, replacement, name)
    return name


def _load_guard_only_folder(path: str, config, dtype, device):
    """A guard-only base from a folder of safetensors weights (sharded or not).

    The base is built on the meta device (no memory), made guard-only
    (:func:`drop_language_model`), and then only its remaining tensors (vision tower, token
    embeddings) are read from the checkpoint with ``safe_open``: the other tensors are never
    read, and never allocated.
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open

    from safevlm.backbones import get_backbone_class
    from safevlm.compat import quiet_loading
    from safevlm.errors import UsageError

    files = _weight_files(Path(path))
    if files is None:
        raise UsageError(f"{path}: guard-only loading reads safetensors weights (model.safetensors or "
                         "model.safetensors.index.json), and the folder has none")
    with init_empty_weights(include_buffers=False), quiet_loading():  # buffers are real, parameters meta
        model = get_backbone_class(config).model_class()(config)
    drop_language_model(model)
    model_type = getattr(config, "model_type", None)
    on_disk = {canonical_name(model_type, key): key for key in files}
    wanted = {name: canonical_name(model_type, name) for name in model.state_dict()}
    missing = sorted(name for name, canonical in wanted.items() if canonical not in on_disk)
    if missing:
        raise UsageError(f"{path}: the checkpoint has no tensor for {len(missing)} of the guard's weights "
                         f"(e.g. {', '.join(missing[:3])})")
    state = {}
    by_file: dict[Path, list[str]] = {}
    for name, canonical in wanted.items():
        by_file.setdefault(files[on_disk[canonical]], []).append(name)
    for file, names in sorted(by_file.items()):
        with safe_open(str(file), "pt") as f:
            for name in names:
                state[name] = f.get_tensor(on_disk[wanted[name]]).to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # pragma: no cover - a family whose guard parts hold tensors outside the checkpoint
        raise RuntimeError(f"guard-only load of {path} left {len(left)} tensors unloaded: {left[:3]}")
    model.to(device=device, dtype=dtype)
    model.eval()
    return model


def check_guard_lora(base, lora_dir: str | os.PathLike) -> None:
    """Refuse to load guard-only with a peft adapter that changes what guard reads.

    A guard-only load leaves the LoRA adapter out, which is exact when its tensors all lie in
    parts guard never runs (safevlm's stage-2 LoRA: the language model's linear layers, see
    ``safevlm.train.stage.lora_target_regex``). Only the adapter's tensor names are read.
    Raises ValueError naming the tensors that touch the vision tower or the token embeddings
    (LoRA, ``modules_to_save`` or trainable tokens there).
    """
    from safetensors import safe_open

    lora_dir = Path(lora_dir)
    weights = lora_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{lora_dir}: no adapter_model.safetensors (guard-only loading reads only safetensors adapters)")
    inner = base.get_base_model() if hasattr(base, "get_base_model") else base
    model_type = getattr(inner.config, "model_type", None)
    kept = [canonical_name(model_type, _qualified_name(inner, module) + ".") for module in guard_modules(inner).values()]
    with safe_open(str(weights), "pt") as f:
        keys = list(f.keys())
    touching = sorted(key for key in keys if any(canonical_name(model_type, key).startswith(k) for k in kept))
    if touching:
        raise ValueError(
            f"{weights}: {len(touching)} LoRA tensors change parts the guard reads (e.g. {', '.join(touching[:3])}); "
            "a guard-only load leaves the LoRA out, so its guard would differ from the full model's. "
            "Load the model without guard_only"
        )


def _qualified_name(root, module) -> str:
    for name, candidate in root.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(root).__name__}")  # pragma: no cover


# ------------------------------------------------------------------------------------ the base
def load_processor(path: str | os.PathLike):
    """A folder's processor, with the PIL image processor on both transformers lines (no
    notice on stderr; the same pixels in training and serving). A tiny Qwen folder built
    without torchvision names an image-only processor class, registered here first."""
    from transformers import AutoProcessor

    from safevlm.compat import processor_load_kwargs
    from safevlm.tiny import register_image_only_processors

    register_image_only_processors()
    return AutoProcessor.from_pretrained(str(path), **processor_load_kwargs())


def _load(base, dtype, device, trust_remote_code: bool, want_processor: bool, guard_only: bool = False):
    """(base model, processor or None) in the resolved dtype on the resolved device, with its
    checkpoint fingerprint recorded. ``guard_only``: only what guard reads (see
    :func:`drop_language_model`); a folder's other tensors are never read."""
    from safevlm.compat import quiet_loading
    from safevlm.devices import resolve_device

    if isinstance(base, nn.Module):
        if guard_only and not is_guard_only(base):
            drop_language_model(base)  # in place: the caller's model loses its language model
        if device is not None:
            device = resolve_device(device)
        target = resolve_dtype(dtype, device if device is not None else _model_device(base))
        if base.get_input_embeddings().weight.dtype != target:
            checkpoint = base_fingerprint(base)  # before rounding to another dtype
            base.to(dtype=target)
            _record_fingerprint(base, checkpoint)
        if device is not None:
            base.to(device)
        return base, None

    device = resolve_device(device)
    target = resolve_dtype(dtype, device)
    tiny = parse_tiny_spec(base)
    if tiny is not None:
        from safevlm.tiny import build_tiny

        model, processor = build_tiny(*tiny)
        checkpoint = _memory_fingerprint(model)  # as built, in float32
        if guard_only:
            drop_language_model(model)  # built whole (it is tiny), then the language model goes
        model.to(device=device, dtype=target)
        _record_fingerprint(model, checkpoint)
        return model, processor

    from transformers import AutoConfig

    from safevlm.backbones import get_backbone_class

    path = str(base)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    get_backbone_class(config)  # a clear error for unsupported families before loading weights
    checkpoint = folder_fingerprint(path, config) if os.path.isdir(path) else None
    if guard_only:
        model = _load_guard_only_folder(path, config, target, device)
        _record_fingerprint(model, checkpoint)
        return model, (load_processor(path) if want_processor else None)
    with quiet_loading():
        model = get_backbone_class(config).model_class().from_pretrained(
            path, config=config, dtype=target, trust_remote_code=trust_remote_code
        )
    model.to(device)
    model.eval()
    _record_fingerprint(model, checkpoint)
    return model, (load_processor(path) if want_processor else None)


def load_base_model(base, dtype="auto", device=None, trust_remote_code: bool = False, guard_only: bool = False):
    """A base model (no processor): a folder, a hub id, ``tiny:<preset>[@seed]`` or a model.
    ``guard_only``: only the parts guard reads (:func:`drop_language_model`)."""
    return _load(base, dtype, device, trust_remote_code, want_processor=False, guard_only=guard_only)[0]


def load_base(base, dtype="auto", device=None, processor=None, trust_remote_code: bool = False,
              guard_only: bool = False):
    """(base model, processor). ``processor``: a folder to load it from, a processor object,
    or None for the base's own (None for a model passed in without one). ``guard_only``: only
    the parts guard reads (:func:`drop_language_model`)."""
    model, own = _load(base, dtype, device, trust_remote_code, want_processor=processor is None,
                       guard_only=guard_only)
    if processor is None:
        return model, own
    if isinstance(processor, (str, os.PathLike)):
        return model, load_processor(processor)
    return model, processor


# -------------------------------------------------------------------------- adapter and LoRA
def load_lora(base, lora_dir: str | os.PathLike, trainable: bool = False):
    """A peft model: ``base`` with the LoRA adapter in ``lora_dir`` (trainable or frozen)."""
    from peft import PeftModel

    from safevlm.compat import quiet_loading

    with quiet_loading():
        return PeftModel.from_pretrained(base, str(lora_dir), is_trainable=trainable)


def precheck_adapter(base, adapter_dir, allow_base_mismatch: bool = False, trust_remote_code: bool = False) -> None:
    """Refuse a base folder that does not fit ``adapter_dir`` from its config and a few stored
    tensors, before its weights are loaded (no-op for other bases or without an adapter;
    warnings are left to :func:`load_safety`)."""
    if adapter_dir is None or parse_tiny_spec(base) is not None or not os.path.isdir(str(base)):
        return
    from transformers import AutoConfig

    from safevlm.config import SafetyConfig

    if not Path(adapter_dir).is_dir():
        raise FileNotFoundError(f"adapter folder not found: {adapter_dir}")
    base_config = AutoConfig.from_pretrained(str(base), trust_remote_code=trust_remote_code)
    check_adapter_base(SafetyConfig.load(adapter_dir), base_config, folder_fingerprint(base, base_config),
                       adapter_dir, allow_base_mismatch, warn=False)


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def stored_dtype(base):
    """The dtype a base stores its weights in: that of its token embedding table on disk
    (float32 for ``tiny:`` specs). UsageError when it cannot be told (no safetensors)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig

    from safevlm.errors import UsageError

    if parse_tiny_spec(base) is not None:
        return torch.float32
    folder = Path(base)
    files = _weight_files(folder)
    if files is None:
        raise UsageError(f"cannot tell the dtype {base} stores its weights in (no safetensors files); pass a dtype")
    suffix = FINGERPRINT_TENSORS.get(AutoConfig.from_pretrained(str(folder)).model_type, ("embed_tokens.weight",))[0]
    key = _find(files, suffix) or next(iter(files))
    with safe_open(str(files[key]), "pt") as f:
        stored = f.get_slice(key).get_dtype()
    if stored not in _SAFETENSORS_DTYPES:
        raise UsageError(f"{files[key]}: {key} is stored as {stored}; pass a dtype ({', '.join(DTYPES[1:])})")
    return getattr(torch, _SAFETENSORS_DTYPES[stored])


__all__ = [
    "BaseMismatchError",
    "CHECKPOINT_ALIASES",
    "DTYPES",
    "DTYPE_HELP",
    "DroppedModule",
    "FINGERPRINT_TENSORS",
    "GuardOnlyError",
    "base_fingerprint",
    "canonical_name",
    "check_adapter_base",
    "check_base_signature",
    "check_guard_lora",
    "drop_language_model",
    "folder_fingerprint",
    "guard_modules",
    "is_guard_only",
    "load_base",
    "load_base_model",
    "load_lora",
    "load_processor",
    "parse_tiny_spec",
    "precheck_adapter",
    "resolve_dtype",
    "stored_dtype",
]
