"""`TrainConfig`: one YAML recipe per training stage, validated on load.

A recipe has a few top-level keys and one section per concern::

    stage: 1                     # 1: safety modules on a frozen base; 2: + LoRA on the LLM
    output_dir: runs/stage1
    seed: 42
    model:  {base, adapter, processor, torch_dtype, allow_base_mismatch, safety_modules, safety: {...}}
    lora:   {r, alpha, dropout, target_modules}          # stage 2 only
    loss:   {cls_weight, lm_weight, lm_logits}
    data:   {train, val, format, image_root, check_images, max_length, balance_types, clean_ratio,
             samples_per_epoch, group_by_length, length_window, synthetic}
    cache:  {enabled, dir, batch_size}
    optim:  {lr, epochs, max_steps, warmup_steps, batch_size, ..., precision, deepspeed}
    log:    {logging_steps, eval_steps, save_steps, save_total_limit, progress_bar, plot}

Unknown keys, wrong types and values out of range are errors that name the key and the
allowed values. ``key=value`` overrides use dotted keys (``optim.lr=1e-4``) and YAML values.
Relative paths are relative to the working directory, as with ``accelerate launch``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SAFETY_MODULE_MODES = ("train", "prefix", "frozen")
PRECISIONS = ("fp32", "bf16", "fp16")
TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULERS = ("constant", "linear", "cosine")


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


class ConfigError(ValueError):
    """A recipe that cannot be used; the message names the key."""


# --------------------------------------------------------------------------------------- sections
@dataclass
class ModelSection:
    base: str | None = _help(
        "Base VLM: a Hugging Face folder (e.g. a local llava-1.5-7b-hf), a hub id where the "
        "environment allows downloads, or 'tiny:<preset>' / 'tiny:<preset>@<seed>' for the "
        "embedded tiny LLaVA. Not needed when run_stage() gets a model.",
        default=None,
    )
    processor: str | None = _help("Processor folder (default: the base folder).", default=None)
    adapter: str | None = _help(
        "Start from this safety adapter folder (stage 2: the stage-1 output, e.g. runs/stage1/adapter).",
        default=None,
    )
    torch_dtype: str = _help(
        f"dtype the base is loaded in: {', '.join(TORCH_DTYPES)} (auto: float32 on CPU, bfloat16 on GPUs "
        "that support it, else float16).",
        default="auto",
    )
    allow_base_mismatch: bool = _help(
        "Start from an adapter trained on a base with other weights (its fingerprint differs), with a "
        "warning; by default that is an error.",
        default=False,
    )
    safety_modules: str = _help(
        "Safety projector, head and prefix tokens in stage 2: 'train' (all), 'prefix' (the prefix tokens "
        "only: the stage-1 head and projector stay exactly as they are) or 'frozen' (stage 1 must train them).",
        default="train",
    )
    gradient_checkpointing: bool = _help("Recompute LLM activations in backward (saves memory).", default=False)
    safety: dict = _help(
        "SafetyConfig fields for fresh safety modules (ignored when 'adapter' is set).", default_factory=dict
    )

    def validate(self) -> None:
        _choice("model.torch_dtype", self.torch_dtype, TORCH_DTYPES)
        _choice("model.safety_modules", self.safety_modules, SAFETY_MODULE_MODES)
        if self.safety:
            from safevlm.config import SafetyConfig

            for key in ("cls_loss_weight", "lm_loss_weight"):
                if key in self.safety:
                    raise ConfigError(f"model.safety.{key}: set loss weights in the 'loss' section")
            names = {f.name for f in dataclasses.fields(SafetyConfig)}
            unknown = sorted(set(self.safety) - names)
            if unknown:
                raise ConfigError(f"model.safety: unknown SafetyConfig field(s) {unknown}; allowed: {sorted(names)}")


@dataclass
class LoraSection:
    r: int = _help("LoRA rank (paper: 256).", default=256)
    alpha: float = _help("LoRA alpha (paper: 16).", default=16.0)
    dropout: float = _help("LoRA dropout in [0, 1) (paper: 0.05).", default=0.05)
    target_modules: str | list[str] = _help(
        "'all-linear': every linear layer of the language model (not the vision tower, the base "
        "projector or the LM head); or a list of layer names inside the language model "
        "(e.g. [q_proj, v_proj]).",
        default="all-linear",
    )

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            raise ConfigError(
                f"lora.target_modules must be 'all-linear' or a list of layer names, got {self.target_modules!r}"
            )
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("lora.target_modules is an empty list")


@dataclass
class LossSection:
    cls_weight: float = _help("w_cls: weight of CE_level + CE_type (paper: 10).", default=10.0)
    lm_weight: float = _help(
        "w_lm: weight of the LM loss. Stage 1 may use 0, and then the LLM is not run at all; "
        "stage 2 trains the LLM and needs > 0.",
        default=1.0,
    )
    lm_logits: str = _help(
        "Where the LM loss computes logits: 'supervised' (the LM head at the supervised tokens only: "
        "the same loss for less compute and memory) or 'full' (every token; the same value up to float "
        "rounding, which a run as small as the demo's can amplify).",
        default="supervised",
    )

    def validate(self) -> None:
        _choice("loss.lm_logits", self.lm_logits, ("supervised", "full"))
        if self.cls_weight < 0 or self.lm_weight < 0:
            raise ConfigError(f"loss weights must be >= 0, got cls_weight={self.cls_weight}, lm_weight={self.lm_weight}")
        if self.cls_weight == 0 and self.lm_weight == 0:
            raise ConfigError("loss.cls_weight and loss.lm_weight are both 0: nothing to train")


@dataclass
class SyntheticSection:
    dir: str = _help("Folder for the synthetic dataset (made once, reused by stage 1 and 2).", default="runs/synth")
    n: int = _help("Samples in all splits together (80/10/10).", default=2400)
    seed: int = _help("Seed of the synthetic data.", default=0)
    clean_ratio: float = _help("Clean samples per risky sample in the generated data.", default=3 / 11)
    image_size: int = _help("Square image side in pixels.", default=112)
    multi_turn_ratio: float = _help(
        "Share of train/val samples asked as the second user turn of a conversation (after a benign "
        "first exchange), so the head learns to read every user turn.",
        default=0.2,
    )

    def validate(self) -> None:
        if not 0 <= self.multi_turn_ratio <= 1:
            raise ConfigError(f"data.synthetic.multi_turn_ratio must be in [0, 1], got {self.multi_turn_ratio}")
        if self.n < 3:
            raise ConfigError(f"data.synthetic.n must be >= 3, got {self.n}")
        if self.clean_ratio < 0:
            raise ConfigError(f"data.synthetic.clean_ratio must be >= 0, got {self.clean_ratio}")


@dataclass
class DataSection:
    train: str | None = _help("Training file (PSA-VLM jsonl, or any format load_records reads).", default=None)
    val: str | None = _help("Validation file; evaluated during training (per-head accuracy, macro-F1).", default=None)
    format: str | None = _help("Data format (default: detected).", default=None)
    image_root: str | None = _help("Folder image paths are relative to (default: each file's folder).", default=None)
    check_images: bool = _help("Decode every image on load and skip broken ones (with the reason).", default=True)
    max_length: int | None = _help("Truncate token sequences to this length (default: no limit).", default=None)
    balance_types: bool = _help("Sample risky records equally across risk types each epoch.", default=True)
    clean_ratio: float | None = _help(
        "Clean (safe) samples per risky sample drawn each epoch (PSA-VLM: 3/11 ~ 0.27); "
        "null keeps the ratio of the data.",
        default=None,
    )
    samples_per_epoch: int | None = _help("Samples drawn per epoch (default: the training set size).", default=None)
    group_by_length: bool = _help(
        "Batch records of similar token length together (less padding, same samples per epoch; "
        "as Hugging Face's group_by_length).",
        default=False,
    )
    length_window: int = _help(
        "With group_by_length: how many batches are sorted by length together (Hugging Face: 50). "
        "A small window (2-4) keeps every batch a random mix of the data and still cuts most padding.",
        default=50,
    )
    decision_swap_ratio: float = _help(
        "Stage 2 with prefix_conditioning 'decision': this share of the safe training records (those "
        "ending with an answer) is added again as a decision swap: the prefix tokens carry a risky "
        "record's decision (its risk level and type) and the answer is that record's answer; the head "
        "still learns the safe label. The LLM learns to answer as the head decides, not by the "
        "prompt's wording (safevlm.train.swaps). 0: none.",
        default=0.0,
    )
    hint_ratio: float = _help(
        "Stage 2: this share of the training records reads a policy hint, inserted as the policy "
        "inserts it (a risky record: the hint for its own type and level; a safe one: a random risky "
        "type's), with the record's own answer; the head does not read it. The LLM learns to keep "
        "following the head's decision when a policy hints (safevlm.train.hints). 0: none.",
        default=0.0,
    )
    hint_policy: str = _help(
        "The policy (shipped name or YAML path) whose hint texts and hint position hint_ratio uses.",
        default="default",
    )
    synthetic: SyntheticSection | None = _help(
        "Generate a synthetic dataset (safevlm.data.synth) and use its train/val splits.", default=None
    )

    def validate(self) -> None:
        if self.synthetic is not None:
            self.synthetic.validate()
            if self.train is not None or self.val is not None:
                raise ConfigError("data: set either data.synthetic or data.train/data.val, not both")
        if self.max_length is not None and self.max_length < 8:
            raise ConfigError(f"data.max_length must be >= 8, got {self.max_length}")
        if self.clean_ratio is not None and self.clean_ratio < 0:
            raise ConfigError(f"data.clean_ratio must be >= 0 (clean per risky sample), got {self.clean_ratio}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ConfigError(f"data.samples_per_epoch must be >= 1, got {self.samples_per_epoch}")
        if self.length_window < 1:
            raise ConfigError(f"data.length_window must be >= 1 (batches sorted together), got {self.length_window}")
        if not 0.0 <= self.decision_swap_ratio <= 1.0:
            raise ConfigError(f"data.decision_swap_ratio must be in [0, 1], got {self.decision_swap_ratio}")
        if not 0.0 <= self.hint_ratio <= 1.0:
            raise ConfigError(f"data.hint_ratio must be in [0, 1], got {self.hint_ratio}")


@dataclass
class CacheSection:
    enabled: bool = _help(
        "Cache the frozen vision tower's selected-layer features (safetensors shards) and skip the "
        "vision tower in training.",
        default=True,
    )
    dir: str | None = _help(
        "Cache folder (default: <output_dir>/../feature_cache, shared by stage 1 and 2 runs beside it).",
        default=None,
    )
    batch_size: int = _help("Images per vision-tower batch when filling the cache.", default=64)
    shard_size: int = _help("Images per safetensors shard.", default=4096)

    def validate(self) -> None:
        if self.batch_size < 1 or self.shard_size < 1:
            raise ConfigError(f"cache.batch_size and cache.shard_size must be >= 1, got {self.batch_size}, {self.shard_size}")


@dataclass
class OptimSection:
    lr: float = _help("Peak learning rate (paper: 1e-5).", default=1e-5)
    epochs: float = _help("Training epochs (paper: 3).", default=3.0)
    max_steps: int = _help("Stop after this many optimizer steps (-1 = off; overrides epochs).", default=-1)
    warmup_steps: int = _help("Linear warm-up steps (paper: 20 in stage 1, 300 in stage 2).", default=0)
    scheduler: str = _help(f"Learning-rate schedule after warm-up: {', '.join(SCHEDULERS)}.", default="cosine")
    batch_size: int = _help("Samples per device per step.", default=16)
    eval_batch_size: int | None = _help("Samples per device in evaluation (default: batch_size).", default=None)
    grad_accum: int = _help("Gradient accumulation steps.", default=1)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    max_grad_norm: float = _help("Gradient clipping norm (0 = off).", default=1.0)
    precision: str = _help(f"Mixed precision: {', '.join(PRECISIONS)} (fp32 on CPU).", default="fp32")
    deepspeed: str | None = _help("DeepSpeed config JSON (e.g. configs/ds_zero2.json); null = none.", default=None)
    num_workers: int = _help("DataLoader workers (0 on CPU).", default=0)

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError(f"optim.epochs must be > 0 (or set optim.max_steps), got {self.epochs}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"optim.max_steps must be -1 (off) or >= 1, got {self.max_steps}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"optim.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError(f"optim.eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm < 0 or self.num_workers < 0:
            raise ConfigError("optim.warmup_steps, weight_decay, max_grad_norm and num_workers must be >= 0")
        _choice("optim.scheduler", self.scheduler, SCHEDULERS)
        _choice("optim.precision", self.precision, PRECISIONS)


@dataclass
class LogSection:
    logging_steps: int = _help("Log losses every N optimizer steps.", default=10)
    eval_steps: int = _help("Evaluate on data.val every N steps (-1 = at the end of every epoch, 0 = off).", default=-1)
    save_steps: int = _help("Write a checkpoint every N steps (-1 = at the end of every epoch, 0 = off).", default=-1)
    save_total_limit: int | None = _help("Keep at most this many checkpoints (null = all).", default=2)
    progress_bar: bool = _help("Show a progress bar.", default=True)
    plot: bool = _help("Write loss.png in the output folder at the end.", default=True)

    def validate(self) -> None:
        if self.logging_steps < 1:
            raise ConfigError(f"log.logging_steps must be >= 1, got {self.logging_steps}")
        for name in ("eval_steps", "save_steps"):
            if getattr(self, name) < -1:
                raise ConfigError(f"log.{name} must be -1 (every epoch), 0 (off) or >= 1, got {getattr(self, name)}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(f"log.save_total_limit must be >= 1 or null, got {self.save_total_limit}")


# --------------------------------------------------------------------------------------- recipe
@dataclass
class TrainConfig:
    """A training recipe: which stage, which base, what trains, on what data, how long."""

    stage: int = _help("1: safety modules on a frozen base; 2: LoRA on the LLM (+ safety modules if 'train').", default=1)
    output_dir: str = _help("Run folder: checkpoints, adapter/, metrics.jsonl, loss.png.", default="runs/stage1")
    seed: int = _help("Seed of initialisation, sampling and dropout.", default=42)
    overwrite: bool = _help(
        "Start afresh in an output_dir that holds checkpoints of an earlier run, deleting them "
        "(without it such a run is refused: pass --resume to continue it instead).",
        default=False,
    )
    model: ModelSection = _help("The base model and the safety modules.", default_factory=ModelSection)
    lora: LoraSection | None = _help("LoRA on the language model (stage 2 only).", default=None)
    loss: LossSection = _help("Loss weights.", default_factory=LossSection)
    data: DataSection = _help("Training and validation data.", default_factory=DataSection)
    cache: CacheSection = _help("Vision-feature cache.", default_factory=CacheSection)
    optim: OptimSection = _help("Optimiser and schedule.", default_factory=OptimSection)
    log: LogSection = _help("Logging, evaluation and checkpointing.", default_factory=LogSection)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _choice("stage", self.stage, (1, 2))
        for section in (self.model, self.loss, self.data, self.cache, self.optim, self.log):
            section.validate()
        if self.lora is not None:
            self.lora.validate()
        if self.stage == 1:
            if self.lora is not None:
                raise ConfigError("stage 1 freezes the whole base; remove the 'lora' section (LoRA is stage 2)")
            if self.model.safety_modules != "train":
                raise ConfigError("stage 1 trains the safety modules; model.safety_modules must be 'train'")
        else:
            if self.lora is None:
                raise ConfigError("stage 2 needs a 'lora' section (r, alpha, dropout, target_modules)")
            if self.loss.lm_weight == 0:
                raise ConfigError("stage 2 trains the language model: loss.lm_weight must be > 0")
            if self.model.safety_modules == "frozen" and self.loss.lm_weight == 0:
                raise ConfigError("nothing to train")
        if self.data.decision_swap_ratio > 0 and (self.stage != 2 or self.loss.lm_weight == 0):
            raise ConfigError("data.decision_swap_ratio trains the language model on the head's decision: "
                              "stage 2 with loss.lm_weight > 0 only")
        if self.data.hint_ratio > 0 and (self.stage != 2 or self.loss.lm_weight == 0):
            raise ConfigError("data.hint_ratio trains the language model to read policy hints: "
                              "stage 2 with loss.lm_weight > 0 only")

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, overrides: "list[str] | dict | None" = None, source: str = "config") -> "TrainConfig":
        data = _deep_copy(data or {})
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a recipe is a mapping of keys, got {type(data).__name__}")
        for key, value in _parse_overrides(overrides).items():
            _set_dotted(data, key, value, source)
        try:
            return _build(cls, data, "")
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_yaml(cls, path: "str | Path", overrides: "list[str] | dict | None" = None) -> "TrainConfig":
        """Load and validate a recipe; ``overrides`` are ``["optim.lr=1e-4", ...]`` or a dict."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such config file: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML ({err})") from None
        return cls.from_dict(data or {}, overrides, source=str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes) -> "TrainConfig":
        """A validated copy with dotted-key changes, e.g. ``replace(**{"optim.lr": 1e-3})``."""
        return TrainConfig.from_dict(self.to_dict(), changes)

    # -- derived --------------------------------------------------------------------------------
    @property
    def adapter_dir(self) -> Path:
        """Where the final adapter is written."""
        return Path(self.output_dir) / "adapter"

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache.dir) if self.cache.dir else Path(self.output_dir).parent / "feature_cache"


# --------------------------------------------------------------------------------------- helpers
def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _parse_overrides(overrides) -> dict:
    import yaml

    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=1e-4)")
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from None
    return parsed


def _set_dotted(data: dict, key: str, value, source: str) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: override {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        item = typing.get_args(tp)[0]
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(item, _type_name(item))
    if dataclasses.is_dataclass(tp):
        return "a section (mapping)"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(tp, value, key: str):
    """``value`` checked against type ``tp`` (ints accepted for floats); raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a section (mapping), got {value!r}")
        return _build(tp, value, key + ".")
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
        return [_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-5" (no dot) as a string; accept numeric strings.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")  # pragma: no cover


def _build(cls, data: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"section '{prefix[:-1]}'" if prefix else "the recipe"
        raise ConfigError(f"unknown key(s) {', '.join(prefix + u for u in unknown)} in {where}; allowed: {', '.join(names)}")
    kwargs = {name: _coerce(hints[name], data[name], prefix + name) for name in names if name in data}
    obj = cls.__new__(cls)
    # Build without running TrainConfig.__post_init__ twice: set defaults, then validate once.
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            value = kwargs[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            value = f.default_factory()
        object.__setattr__(obj, f.name, value)
    if cls is TrainConfig:
        obj.validate()
    return obj


def describe(cls=TrainConfig, prefix: str = "") -> list[str]:
    """One line per key with its help text (for ``safevlm train --list-keys`` and the docs)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        section = next((a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)), None)
        if section is not None:
            lines.append(f"{prefix}{f.name}: {f.metadata.get('help', '')}")
            lines.extend(describe(section, prefix + f.name + "."))
        else:
            lines.append(f"{prefix}{f.name} ({_type_name(tp)}): {f.metadata.get('help', '')}")
    return lines


__all__ = [
    "CacheSection",
    "ConfigError",
    "DataSection",
    "LogSection",
    "LoraSection",
    "LossSection",
    "ModelSection",
    "OptimSection",
    "SyntheticSection",
    "TrainConfig",
    "describe",
]
