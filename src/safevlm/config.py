"""`SafetyConfig`: everything that shapes the safety modules, with dimensions read from the base.

A config is built from a base model's config with :meth:`SafetyConfig.from_base_config`, so the
vision width, text width, number of image features and feature layer are never copied by hand.
It is saved beside the adapter weights as ``safety_config.json`` and checked against the base
when an adapter is loaded. It holds what rebuilds the modules only: training settings such as
the loss weights live in the training recipe (``TrainConfig.loss``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from safevlm.taxonomy import DEFAULT_LEVEL_NAMES, DEFAULT_TYPE_NAMES, Taxonomy

PROJECTOR_KINDS = ("mlp", "cabstractor")
PREFIX_CONDITIONING = ("head", "decision", "none")
CONFIG_NAME = "safety_config.json"
# Training settings that older adapters saved here; now in the recipe (TrainConfig.loss).
LEGACY_TRAINING_FIELDS = ("cls_loss_weight", "lm_loss_weight")


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class SafetyConfig:
    """Configuration of the safety projector, safety head and prefix safety tokens.

    Fields under "from the base" are filled by :meth:`from_base_config`; an adapter whose
    base fields differ from the base it is loaded onto is refused.
    """

    # -- taxonomy ---------------------------------------------------------------------------
    type_names: list[str] = _help(
        "Risk type names; the index is the class id of the type head.",
        default_factory=lambda: list(DEFAULT_TYPE_NAMES),
    )
    level_names: list[str] = _help(
        "Risk level names, from safe (0) to most serious.", default_factory=lambda: list(DEFAULT_LEVEL_NAMES)
    )
    safe_type: str = _help("The type name that means 'no risk'.", default="safe")

    # -- modules ----------------------------------------------------------------------------
    projector_kind: str = _help(
        "Safety projector: 'mlp' (per-patch MLP, M = N) or 'cabstractor' (conv residual blocks "
        "over the patch grid, adaptive pooling to a square grid of M tokens, MLP readout).",
        default="mlp",
    )
    num_safety_features: int | None = _help(
        "M, the number of safety features per image that the projector outputs. 'mlp' keeps the "
        "N image features (leave None: filled in from the base; stays None on bases whose images "
        "give variable numbers of features); 'cabstractor' needs a square number (default 64).",
        default=None,
    )
    cabstractor_depth: int = _help("Residual conv blocks before and after pooling (cabstractor).", default=2)
    safety_dim: int | None = _help("Ds, the width of safety features (default: the head width).", default=None)
    num_query_tokens: int = _help("Learned query tokens of the safety head (paper: 64).", default=64)
    num_prefix_tokens: int = _help(
        "Learned prefix safety tokens placed before the image embeddings in the LLM input "
        "(paper: 64; 0 leaves the LLM input unchanged).",
        default=64,
    )
    prefix_conditioning: str = _help(
        "'head': each prefix token also carries a projection of the safety head's state (safety_state), so "
        "the LLM sees this input's risk (zero-initialised: starts as static tokens); 'decision': a projection "
        "of the head's decision itself, a risk level and type (one-hot; SafeVLM.prefix_state), so that the LLM "
        "can be trained to answer as the head decides (see data.decision_swap_ratio); 'none': static "
        "learned tokens only, as in the paper.",
        default="head",
    )
    head_hidden_size: int | None = _help(
        "Width of the safety head's attention (default: min(text hidden size, 1024)).", default=None
    )
    head_num_heads: int = _help("Attention heads in the safety head; must divide head_hidden_size.", default=8)
    head_num_layers: int = _help("Cross-attention layers in the safety head.", default=2)
    head_use_prompt: bool = _help(
        "Let the head attend over the prompt's token embeddings as well as the safety features.", default=True
    )
    dropout: float = _help("Dropout in the safety projector and head, in [0, 1).", default=0.1)
    prompt_token_dropout: float = _help(
        "In training only: the share of prompt tokens the head does not see, drawn afresh per sample and "
        "step, in [0, 1). Keeps the head from keying on the wording of the training prompts, so that a "
        "request in the image is still read under an unseen prompt (0: off).",
        default=0.0,
    )

    # -- from the base (filled by from_base_config) ------------------------------------------
    base_model_type: str = _help("model_type of the base config, e.g. 'llava'.", default="llava")
    vision_hidden_size: int = _help("Width of the selected vision features (Dv).", default=0)
    text_hidden_size: int = _help("Width of the language model's token embeddings (D).", default=0)
    num_image_features: int = _help("N, image features per image after feature selection.", default=0)
    vision_feature_layer: int | list[int] = _help("Vision layer(s) the features come from.", default=-2)
    vision_feature_select_strategy: str = _help("'default' drops the CLS feature, 'full' keeps it.", default="default")
    image_token_id: int = _help("Token id of the image placeholder in input_ids.", default=-1)
    variable_image_features: bool = _help(
        "Whether the base gives each image its own number of features (anyres tiles, dynamic "
        "resolution); then num_image_features counts one vision-tower crop, the 'mlp' projector "
        "keeps every feature of each image with a mask, and 'cabstractor' pools each image's own grid.",
        default=False,
    )

    # -- the exact base (written by SafeVLM.save_pretrained) -----------------------------------
    base_fingerprint: str | None = _help(
        "Fingerprint of the base weights these modules were trained on (see "
        "safevlm.bases.base_fingerprint). Loading onto a base with another fingerprint is refused "
        "unless allow_base_mismatch is set; None (adapters saved before it was recorded) cannot be checked.",
        default=None,
    )

    def __post_init__(self):
        # the taxonomy validates the names (one implementation, in safevlm.taxonomy)
        taxonomy = self.taxonomy
        self.type_names, self.level_names = list(taxonomy.type_names), list(taxonomy.level_names)
        if self.projector_kind not in PROJECTOR_KINDS:
            raise ValueError(
                f"unknown projector_kind {self.projector_kind!r}; allowed: {', '.join(PROJECTOR_KINDS)}"
            )
        if self.projector_kind == "cabstractor":
            if self.num_safety_features is None:
                self.num_safety_features = 64
            side = math.isqrt(self.num_safety_features)
            if self.num_safety_features < 1 or side * side != self.num_safety_features:
                raise ValueError(
                    f"cabstractor needs a square num_safety_features (e.g. 16, 64, 144), got {self.num_safety_features}"
                )
        elif self.variable_image_features:
            if self.num_safety_features is not None:
                raise ValueError(
                    f"the 'mlp' projector keeps every feature of each image (their number varies on a "
                    f"{self.base_model_type} base); num_safety_features={self.num_safety_features} needs "
                    "projector_kind='cabstractor'"
                )
        elif self.num_safety_features is not None and self.num_image_features and (
            self.num_safety_features != self.num_image_features
        ):
            raise ValueError(
                f"the 'mlp' projector keeps all {self.num_image_features} image features; "
                f"num_safety_features={self.num_safety_features} needs projector_kind='cabstractor'"
            )
        elif self.num_safety_features is None and self.num_image_features:
            self.num_safety_features = self.num_image_features  # mlp: M = N
        if self.prefix_conditioning not in PREFIX_CONDITIONING:
            raise ValueError(
                f"unknown prefix_conditioning {self.prefix_conditioning!r}; allowed: {', '.join(PREFIX_CONDITIONING)}"
            )
        for name in ("num_query_tokens", "head_num_heads", "head_num_layers", "cabstractor_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {self.num_prefix_tokens}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.prompt_token_dropout < 1.0:
            raise ValueError(f"prompt_token_dropout must be in [0, 1), got {self.prompt_token_dropout}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy must be 'default' or 'full', got {self.vision_feature_select_strategy!r}"
            )
        if self.text_hidden_size and self.head_hidden_size is None:
            self.head_hidden_size = min(self.text_hidden_size, 1024)
        if self.head_hidden_size is not None:
            if self.head_hidden_size % self.head_num_heads:
                raise ValueError(
                    f"head_hidden_size {self.head_hidden_size} is not divisible by head_num_heads {self.head_num_heads}"
                )
            if self.safety_dim is None:
                self.safety_dim = self.head_hidden_size

    # -- derived ----------------------------------------------------------------------------
    @property
    def taxonomy(self) -> Taxonomy:
        """The risk taxonomy of these names (a ``ValueError`` names what is wrong with them)."""
        return Taxonomy(tuple(self.type_names), tuple(self.level_names), self.safe_type)

    @property
    def num_types(self) -> int:
        return self.taxonomy.num_types

    @property
    def num_levels(self) -> int:
        return self.taxonomy.num_levels

    def is_bound(self) -> bool:
        """True once the base-model fields have been filled in."""
        return self.vision_hidden_size > 0 and self.text_hidden_size > 0 and self.num_image_features > 0

    def base_signature(self) -> dict:
        """The base-model facts an adapter depends on."""
        return {
            "base_model_type": self.base_model_type,
            "vision_hidden_size": self.vision_hidden_size,
            "text_hidden_size": self.text_hidden_size,
            "num_image_features": self.num_image_features,
        }

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_base_config(cls, base_config, **overrides) -> "SafetyConfig":
        """Fill the base-model fields from a Hugging Face VLM config (``LlavaConfig``)."""
        from safevlm.backbones import get_backbone_class

        backbone_cls = get_backbone_class(base_config)
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(
                f"unknown SafetyConfig field(s) {sorted(unknown)}; allowed: {sorted(f.name for f in fields(cls))}"
            )
        return cls(**{**backbone_cls.config_facts(base_config), **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "SafetyConfig":
        # Adapters saved before loss weights moved to the training recipe carry them; they
        # never shaped the modules, so they are dropped.
        d = {k: v for k, v in d.items() if k not in LEGACY_TRAINING_FIELDS}
        if "num_safety_tokens" in d:  # the name of M before it became num_safety_features
            d.setdefault("num_safety_features", d.pop("num_safety_tokens"))
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{source}: unknown SafetyConfig field(s) {sorted(unknown)}")
        return cls(**d)

    def save(self, directory: str | Path) -> Path:
        """Write ``safety_config.json`` atomically (temp file + rename)."""
        path = Path(directory) / CONFIG_NAME
        tmp = path.with_name(CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "SafetyConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a safety adapter folder")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from err
        return cls.from_dict(data, source=str(path))


__all__ = ["CONFIG_NAME", "PREFIX_CONDITIONING", "PROJECTOR_KINDS", "SafetyConfig"]
