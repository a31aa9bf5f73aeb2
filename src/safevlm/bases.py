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
    return model.get_output_embeddings().weight.device


# -------------------------------------------------------------------------------- fingerprint
# The base tensors a fingerprint samples, per model family, as name suffixes: they match the
# checkpoint keys of every layout (4.57's and 5.x's in memory, the hub's legacy names on disk).
# None of them is a LoRA target (LoRA goes on the language model's linear layers), so a merged
# model keeps its base's fingerprint.
FINGERPRINT_TENSORS = {
    "llava": ("embed_tokens.weight", "patch_embedding.weight", "multi_modal_projector.linear_1.weight"),
}
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
    if got != expected:
        diff = ", ".join(f"{k}: {got[k]} here vs {expected[k]} in the base" for k in got if got[k] != expected[k])
        raise ValueError(f"{source} was made for a base of another shape ({diff})")


# ------------------------------------------------------------------------------------ the base
def load_processor(path: str | os.PathLike):
    """A folder's processor, with the PIL image processor on both transformers lines (no
    notice on stderr; the same pixels in training and serving)."""
    from transformers import AutoProcessor

    from safevlm.compat import processor_load_kwargs

    return AutoProcessor.from_pretrained(str(path), **processor_load_kwargs())


def _load(base, dtype, device, trust_remote_code: bool, want_processor: bool):
    """(base model, processor or None) in the resolved dtype on the resolved device, with its
    checkpoint fingerprint recorded."""
    from torch import nn

    from safevlm.compat import quiet_loading
    from safevlm.devices import resolve_device

    if isinstance(base, nn.Module):
        if device is not None:
            device = resolve_device(device)
        target = resolve_dtype(dtype, device if device is not None else _model_device(base))
        if base.get_output_embeddings().weight.dtype != target:
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
        model.to(device=device, dtype=target)
        _record_fingerprint(model, checkpoint)
        return model, processor

    from transformers import AutoConfig, LlavaForConditionalGeneration

    from safevlm.backbones import get_backbone_class

    path = str(base)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    get_backbone_class(config)  # a clear error for unsupported families before loading weights
    checkpoint = folder_fingerprint(path, config) if os.path.isdir(path) else None
    with quiet_loading():
        model = LlavaForConditionalGeneration.from_pretrained(
            path, config=config, dtype=target, trust_remote_code=trust_remote_code
        )
    model.to(device)
    model.eval()
    _record_fingerprint(model, checkpoint)
    return model, (load_processor(path) if want_processor else None)


def load_base_model(base, dtype="auto", device=None, trust_remote_code: bool = False):
    """A base model (no processor): a folder, a hub id, ``tiny:<preset>[@seed]`` or a model."""
    return _load(base, dtype, device, trust_remote_code, want_processor=False)[0]


def load_base(base, dtype="auto", device=None, processor=None, trust_remote_code: bool = False):
    """(base model, processor). ``processor``: a folder to load it from, a processor object,
    or None for the base's own (None for a model passed in without one)."""
    model, own = _load(base, dtype, device, trust_remote_code, want_processor=processor is None)
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
    "DTYPES",
    "DTYPE_HELP",
    "FINGERPRINT_TENSORS",
    "base_fingerprint",
    "check_adapter_base",
    "check_base_signature",
    "folder_fingerprint",
    "load_base",
    "load_base_model",
    "load_lora",
    "load_processor",
    "parse_tiny_spec",
    "precheck_adapter",
    "resolve_dtype",
    "stored_dtype",
]
