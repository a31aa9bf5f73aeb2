"""The backbone interface: what safevlm needs from a Hugging Face VLM family, and nothing more.

A backbone is a thin view over a loaded base model (never owning or renaming its weights).
:class:`~safevlm.model.SafeVLM` reaches the base only through these hooks, in this order::

    inputs   = process_images(processor, images)        # pixel tensors + image tokens per image
    vision   = backbone.vision_features(**inputs)       # THE one vision-tower pass
    safety   = vision.features / lengths / grids        # what the safety projector reads
    embeds   = backbone.scatter_image_embeds(...)       # base projector -> image tokens
    anchor   = backbone.prefix_anchor(...)              # where the P prefix safety tokens go
    [insert P tokens at anchor: embeds, mask, labels, llm_input_ids]     (SafeVLM, generic)
    pos      = backbone.positions(llm_input_ids, mask, vision)           # position ids (+ rope deltas)
    logits   = backbone.language_forward(embeds, mask, pos)              # decoder + LM head
    tokens   = backbone.generate(model, embeds, mask, pos, **kwargs)     # KV-cache generation

How each hook must behave
-------------------------
``vision_features(pixel_values, **image_inputs)``
    Runs the vision tower exactly once for all images of the batch and returns either the
    selected features as a tensor (num_images, N, Dv) — families whose every image gives the same
    N features on a square grid (LLaVA-1.5) — or a :class:`VisionFeatures`. ``image_inputs``
    are the processor's other outputs that the family names in ``image_input_keys``
    (``image_sizes`` for LLaVA-NeXT / OneVision, ``image_grid_thw`` for Qwen2-VL).
``as_vision_features(x)``
    The :class:`VisionFeatures` view of what ``vision_features`` returned (identity for one).
``image_token_counts(vision)``
    (num_images,) long: how many image placeholder tokens each image occupies in ``input_ids``
    (the processor expands each ``<image>`` to exactly this many; :func:`process_images` reads
    the processor's own count).
``scatter_image_embeds(token_embeds, image_mask, vision)``
    The base projector applied to the features *as the base itself does* (tiles packed,
    newline tokens added, patches merged) and written over the image tokens in order. With no
    prefix tokens, ``language_forward`` on the result must reproduce the base's own logits.
``prefix_anchor(input_ids, image_mask, attention_mask)``
    (B,) index where each sample's P prefix tokens are inserted: by default the first image
    token (the first attended token without an image). A family whose image is wrapped in
    start/end markers (Qwen2-VL's ``<|vision_start|>``, which its M-RoPE reads; Gemma 3's
    ``<start_of_image>``) names the opening marker's config field in ``image_start_token``
    and the anchor goes before the marker, so that the image block stays whole.
``positions(llm_input_ids, attention_mask, vision)``
    :class:`Positions` for the LLM input *after* the prefix tokens were inserted.
    ``llm_input_ids`` (B, L+P) holds the prompt's ids with :data:`PREFIX_TOKEN_ID` (-1, never a
    vocabulary id) at the prefix positions and the image tokens where they sit, so a family
    that derives positions from the image layout (Qwen2-VL's M-RoPE ``get_rope_index`` with
    ``image_grid_thw``) counts the prefix tokens as text. Default: 1-D positions counted over
    attended tokens, (B, L+P), no rope deltas. M-RoPE returns position_ids (3, B, L+P) and
    ``rope_deltas`` (B, 1) = max position + 1 - sequence length, which decoding steps add to
    ``cache_position``. A family whose attention mask reads the image layout (Gemma 3: the
    tokens of one image attend to each other both ways) also returns ``token_type_ids``
    (B, L+P), 1 at the image tokens (the prefix tokens are text).
``language_forward(inputs_embeds, attention_mask, positions)``
    Decoder + LM head on embeddings -> logits (B, L+P, vocab), with the base's own attention
    mask for the layout ``positions`` describe.
``generate(model, inputs_embeds, attention_mask, positions, **kwargs)``
    KV-cache generation from embeddings; returns the new tokens only (B, T_new). It must
    continue the positions exactly as a no-cache forward over the growing sequence would
    (the ``cache_position`` of step t is L+P+t; a 1-D family's next position is the count of
    attended tokens; an M-RoPE family's is ``cache_position + rope_deltas``). Default: the
    base's own ``generate(inputs_embeds=..., attention_mask=...)``, which does exactly that for
    1-D positions.
``base_text_inputs(input_ids)``
    What the base's *own* ``forward`` / ``generate`` reads beside ``input_ids`` and
    ``attention_mask`` when a prompt was tokenised without the processor (evaluation of the
    plain base): none by default; Qwen2-VL on transformers 5.x reads ``mm_token_type_ids``,
    Gemma 3 ``token_type_ids``.

How a prompt holds an image (:func:`image_prompt`): the chat template writes one placeholder
per image and the processor expands it to the image's tokens; usually the placeholder is the
image token itself, repeated (``<image>``, ``<|image_pad|>``), but Gemma 3's template writes
``<start_of_image>``, which its processor turns into a whole block,
``\n\n<start_of_image>`` + N x ``<image_soft_token>`` + ``<end_of_image>\n\n``.

One image per sample stays the rule for the safety head: every family here gives one
:class:`VisionFeatures` row per image, and a sample reads the row of its own image.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
PREFIX_TOKEN_ID = -1  # marks the prefix safety tokens in the LLM-side input ids (not a vocabulary id)
TEXT_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def causal_lm_loss(logits: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts ``labels[:, t + 1]``.

    logits (B, L, vocab), labels (B, L) with -100 where nothing is supervised -> scalar (float32),
    the mean over supervised tokens. A batch with no supervised token gives 0 that still
    belongs to the graph (so every rank of a distributed run takes part in backward).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits cover {tuple(logits.shape[:2])} (batch, tokens) but labels {tuple(labels.shape)}")
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    if not bool((shift_labels != IGNORE_INDEX).any()):
        return shift_logits.sum() * 0.0
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


class _DeepEnough(Exception):
    """Stops a vision tower once the deepest hidden state that is read has been computed."""


def tower_hidden_states(tower: nn.Module, pixel_values: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
    """``[tower(pixel_values, output_hidden_states=True).hidden_states[i] for i in layers]``, without
    running the layers after the deepest selected one.

    LLaVA reads the penultimate layer (``vision_feature_layer=-2``): the last encoder layer's
    output is never used, yet the tower runs it. Here forward hooks on ``encoder.layers``
    take the selected states as they are computed (``hidden_states[k]`` is the output of layer
    k - 1, or the input of layer k) and stop the tower after the deepest one: the same tensors
    (and the same gradients) for less compute. Only the calling thread is stopped (another
    thread may run the same tower whole meanwhile). The tower's own forward hooks do not fire
    (its forward does not return; pre-hooks do). Towers without ``encoder.layers``, with
    gradient checkpointing or accelerate hooks, or in a distributed run run whole.
    """
    from safevlm.compat import is_checkpointing

    encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
    blocks = getattr(encoder, "layers", None)
    # distributed wrappers gather and free weights around each module, accelerate's offload hooks
    # move them back after it, checkpointed layers recompute under their own wrapper: all run whole
    whole = (torch.distributed.is_available() and torch.distributed.is_initialized()) or is_checkpointing(
        tower) or hasattr(tower, "_hf_hook")
    n = len(blocks) if isinstance(blocks, nn.ModuleList) else None
    if n is not None and any(not -(n + 1) <= i <= n for i in layers):
        raise ValueError(f"vision_feature_layer {layers} is out of range for a vision tower of {n} layers")
    absolute = [i % (n + 1) for i in layers] if n else []
    if n is None or whole or max(absolute) in (0, n):  # nothing to skip (0: the embeddings alone)
        outputs = tower(pixel_values, output_hidden_states=True)
        return [outputs.hidden_states[i] for i in layers]
    depth, owner, taken = max(absolute), threading.get_ident(), {}

    def make_hook(j):
        def hook(module, args, output):
            if threading.get_ident() != owner or not args:  # (a layer called without positional input runs on)
                return
            taken[j] = args[0]  # the input of layer j: hidden_states[j]
            taken[j + 1] = output[0] if isinstance(output, tuple) else output
            if j + 1 == depth:
                raise _DeepEnough
        return hook

    handles = [blocks[j].register_forward_hook(make_hook(j)) for j in range(depth)]
    try:
        outputs = tower(pixel_values, output_hidden_states=True)
    except _DeepEnough:
        return [taken[k] for k in absolute]
    finally:
        for handle in handles:
            handle.remove()
    return [outputs.hidden_states[i] for i in layers]  # the hooks could not stop it: it ran whole, once


def supervised_lm_loss(hidden: torch.Tensor, labels: torch.LongTensor, lm_head: nn.Module) -> torch.Tensor:
    """``causal_lm_loss(lm_head(hidden), labels)`` with the LM head run at the supervised positions only.

    hidden (B, L, D) final decoder states, labels (B, L) -> the same scalar (float32): training
    needs no other logits, and the head over the whole vocabulary at every prompt, image and
    padding token is a large share of a small model's compute.
    """
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden states cover {tuple(hidden.shape[:2])} (batch, tokens) but labels {tuple(labels.shape)}")
    shift_labels = labels[:, 1:].to(hidden.device)
    keep = shift_labels != IGNORE_INDEX
    if not bool(keep.any()):
        return lm_head(hidden[:, :1]).float().sum() * 0.0
    return F.cross_entropy(lm_head(hidden[:, :-1][keep]).float(), shift_labels[keep])


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Positions (B, L) counted over attended tokens, as Hugging Face generation does (padding: 1)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


# ----------------------------------------------------------------------------------- data types
@dataclass
class VisionFeatures:
    """One vision pass over a batch of images, in the forms its two readers need.

    Safety side (what the safety projector reads), one row per image:

    * ``features`` (num_images, N_max, Dv): each image's selected vision features, *before* the
      base projector, in the order the base lays the image out (LLaVA-NeXT: the base tile, then
      the tiles' unpadded high-resolution grid row by row; no newline tokens, which exist only
      after projection), padded at the end;
    * ``lengths`` (num_images,) long: valid features per image (the rest is padding);
    * ``grids`` (num_images, 3) long: ``(offset, rows, cols)`` of the image's own 2-D feature grid
      inside its row (``features[i, offset:offset + rows * cols]`` row-major): what the
      ``cabstractor`` pools to M tokens.

    Base side: ``base_inputs``, one entry per image, whatever the family's base projector path
    reads (LLaVA-NeXT: the image's tiles (num_tiles, N, Dv)); ``meta``: per-image tensors with
    the image on dim 0 that the family needs again later (``image_sizes``, ``image_grid_thw``).

    ``index_select(0, rows)`` / ``device`` / ``shape`` mirror a tensor's, so code that picks the
    rows of some images works on both forms.
    """

    features: torch.Tensor
    lengths: torch.LongTensor
    grids: torch.LongTensor
    base_inputs: tuple | None = None
    meta: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.features.device

    @property
    def shape(self) -> torch.Size:
        return self.features.shape

    @property
    def mask(self) -> torch.Tensor:
        """(num_images, N_max) bool, True at valid features."""
        n = self.features.shape[1]
        return torch.arange(n, device=self.features.device).unsqueeze(0) < self.lengths.to(self.features.device).unsqueeze(1)

    def index_select(self, dim: int, index: torch.Tensor) -> "VisionFeatures":
        """The features of the images ``index`` (dim must be 0), padding trimmed to the longest."""
        if dim != 0:
            raise ValueError(f"VisionFeatures select images (dim 0), got dim {dim}")
        rows = index.to(self.features.device)
        lengths = self.lengths.to(rows.device).index_select(0, rows)
        width = int(lengths.max()) if lengths.numel() else 0
        cpu_rows = rows.tolist()
        return VisionFeatures(
            features=self.features.index_select(0, rows)[:, :width],
            lengths=lengths,
            grids=self.grids.to(rows.device).index_select(0, rows),
            base_inputs=None if self.base_inputs is None else tuple(self.base_inputs[r] for r in cpu_rows),
            meta={k: v.index_select(0, torch.tensor(cpu_rows, dtype=torch.long, device=v.device)) for k, v in self.meta.items()},
        )

    def to(self, *args, **kwargs) -> "VisionFeatures":
        """Floating tensors cast / moved as ``Tensor.to``; integer ones only moved."""
        def move(t):
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            device = next((a for a in args if isinstance(a, (str, torch.device))), kwargs.get("device"))
            return t if device is None else t.to(device)

        return replace(
            self,
            features=move(self.features),
            lengths=move(self.lengths),
            grids=move(self.grids),
            base_inputs=None if self.base_inputs is None else tuple(move(t) for t in self.base_inputs),
            meta={k: move(v) for k, v in self.meta.items()},
        )

    @classmethod
    def pad(cls, per_image: list[torch.Tensor], grids: list[tuple[int, int, int]], **kwargs) -> "VisionFeatures":
        """Stack per-image feature sequences (n_i, Dv) into a padded batch."""
        lengths = torch.tensor([t.shape[0] for t in per_image], dtype=torch.long, device=per_image[0].device)
        width = int(lengths.max())
        padded = per_image[0].new_zeros((len(per_image), width, per_image[0].shape[-1]))
        for i, t in enumerate(per_image):
            padded[i, : t.shape[0]] = t
        return cls(padded, lengths, torch.tensor(grids, dtype=torch.long, device=padded.device), **kwargs)


@dataclass
class Positions:
    """Position ids of the LLM input: ``position_ids`` (B, L) for 1-D RoPE families, (3, B, L)
    for M-RoPE (Qwen2-VL); ``rope_deltas`` (B, 1) for M-RoPE, else None; ``token_type_ids``
    (B, L) long, 1 at image tokens, where the base's attention mask reads the image layout
    (Gemma 3: bidirectional within each image's block), else None."""

    position_ids: torch.Tensor
    rope_deltas: torch.Tensor | None = None
    token_type_ids: torch.Tensor | None = None


@dataclass
class ImageInputs:
    """The processor's tensors for a list of images and the image tokens each occupies.

    ``tensors``: ``pixel_values`` and the family's other image keys (``image_sizes``...), image
    on dim 0; ``num_tokens``: image placeholder tokens per image, as the processor expands them.
    """

    tensors: dict
    num_tokens: list[int]

    def to(self, device, dtype=None) -> "ImageInputs":
        """Floating tensors to ``device`` / ``dtype``, the others to ``device`` only."""
        moved = {
            k: (v.to(device=device, dtype=dtype) if v.is_floating_point() and dtype is not None else v.to(device))
            for k, v in self.tensors.items()
        }
        return ImageInputs(moved, list(self.num_tokens))

    def pin_memory(self) -> "ImageInputs":
        """Page-locked copies of the tensors (a DataLoader with ``pin_memory=True`` calls this)."""
        return ImageInputs({k: v.pin_memory() for k, v in self.tensors.items()}, list(self.num_tokens))

    @property
    def per_image_rows(self) -> bool:
        """Whether every tensor holds one row per image on dim 0, so that :meth:`select` can pick
        images (dynamic-resolution families, Qwen2-VL, concatenate all images' patches instead)."""
        return all(v.shape[0] == len(self.num_tokens) for v in self.tensors.values())

    def select(self, rows: list[int]) -> "ImageInputs":
        """The inputs of images ``rows`` (pixel tensors keep their padding); only where
        :attr:`per_image_rows` (else pick rows of the vision features instead)."""
        if not self.per_image_rows:
            shapes = {k: tuple(v.shape) for k, v in self.tensors.items()}
            raise ValueError(f"these image inputs {shapes} do not hold one row per image ({len(self.num_tokens)} "
                             "images); select rows of their vision features instead")
        index = torch.tensor(rows, dtype=torch.long)
        return ImageInputs({k: v.index_select(0, index.to(v.device)) for k, v in self.tensors.items()},
                           [self.num_tokens[r] for r in rows])


@dataclass(frozen=True)
class ImagePrompt:
    """How a family's processor writes one image into a prompt's text.

    ``placeholder``: what the chat template writes for an image part and the processor expands;
    ``token``: the token that fills the image's positions in ``input_ids`` (the config's
    ``image_token_id``); one placeholder becomes ``before + token * n + after`` for an image of
    n tokens. LLaVA / Qwen2-VL: placeholder = token (``<image>``, ``<|image_pad|>``), nothing
    around it; Gemma 3: placeholder ``<start_of_image>``, token ``<image_soft_token>``, before
    ``\n\n<start_of_image>``, after ``<end_of_image>\n\n``."""

    placeholder: str
    token: str
    before: str = ""
    after: str = ""

    def expand(self, num_tokens: int) -> str:
        """What one placeholder becomes for an image of ``num_tokens`` tokens."""
        return self.before + self.token * num_tokens + self.after


def image_prompt(processor) -> ImagePrompt:
    """The :class:`ImagePrompt` of a processor, read off the processor itself: a processor that
    expands a begin-of-image token into a whole block (``boi_token`` and
    ``full_image_sequence``, with the tokenizer's ``image_token`` repeated ``image_seq_length``
    times inside: Gemma 3, on both transformers lines) gives that block's rule; any other its
    ``image_token`` (``<image>`` by default), repeated."""
    tokenizer = getattr(processor, "tokenizer", None)
    boi = getattr(processor, "boi_token", None)
    block = getattr(processor, "full_image_sequence", None)
    token = getattr(tokenizer, "image_token", None)
    length = getattr(processor, "image_seq_length", None)
    if boi and block and token and length and token * length in block:
        before, after = block.split(token * length, 1)
        return ImagePrompt(boi, token, before, after)
    token = getattr(processor, "image_token", None) or "<image>"
    return ImagePrompt(token, token)


def _refuse_crops(processor) -> None:
    """One image per sample: refuse an image processor that cuts each image into several crops
    (Gemma 3's pan-and-scan), whose crops the base reads as extra images."""
    image_processor = getattr(processor, "image_processor", processor)
    if getattr(image_processor, "do_pan_and_scan", None):
        raise ValueError(
            f"{type(image_processor).__name__} has do_pan_and_scan=true (preprocessor_config.json): it cuts each "
            "image into several crops that the base reads as extra images, but the safety head reads one image per "
            "sample; set do_pan_and_scan to false"
        )


def process_images(processor, images: list, num_image_tokens: int | None = None) -> ImageInputs:
    """Run the family's processor on ``images`` (one placeholder each, :func:`image_prompt`)
    and read off the pixel tensors and how many image tokens it expands each image to: the
    processor's own rule, for any family (fixed grids, anyres tiles, dynamic resolution).

    ``num_image_tokens``: every image's count where the family's is fixed (LLaVA-1.5's N, see
    :attr:`Backbone.fixed_image_tokens`); then only the image processor runs, since the text
    side would only repeat that number (:meth:`Backbone.image_inputs` passes it).
    An image processor that cuts images into several crops (pan-and-scan) is refused."""
    images = [im.convert("RGB") if hasattr(im, "convert") else im for im in images]
    if not images:
        raise ValueError("process_images needs at least one image")
    _refuse_crops(processor)
    if num_image_tokens is not None:
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        return ImageInputs({"pixel_values": pixel_values}, [int(num_image_tokens)] * len(images))
    tokenizer = processor.tokenizer
    prompt = image_prompt(processor)
    image_token_id = tokenizer.convert_tokens_to_ids(prompt.token)
    # one list of images per prompt, as every family's processor reads it (Gemma 3's reads a flat list as one prompt's)
    out = processor(text=[prompt.placeholder] * len(images), images=[[im] for im in images], return_tensors="pt",
                    padding=True)
    counts = (out["input_ids"] == image_token_id).sum(dim=1).tolist()
    tensors = {k: v for k, v in out.items() if k not in TEXT_INPUT_KEYS and isinstance(v, torch.Tensor)}
    return ImageInputs(tensors, [int(c) for c in counts])


# ----------------------------------------------------------------------------------- interface
class Backbone:
    """Base class of the per-family views; see the module docstring for the hook contract.

    Class facts a family states:

    * ``family``: the name users type (``--family``, ``tiny:<family>_<preset>``);
    * ``model_types``: the ``config.model_type`` values it serves;
    * ``model_class_name``: the plain transformers class that loads such a folder;
    * ``image_input_keys``: processor outputs the vision pass needs besides ``pixel_values``;
    * ``variable_image_features``: whether images give different numbers of features;
    * ``fingerprint_tensors``: checkpoint-key suffixes a base fingerprint samples (none a LoRA
      target, so a merged model keeps its fingerprint);
    * ``lora_target_modules``: the language model's linear layers (what ``all-linear`` LoRA wraps);
    * ``image_start_token``: the config field of the token that opens each image block, where
      the prefix tokens go (None: they go right before the first image token).
    """

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    model_class_name: ClassVar[str] = ""
    image_input_keys: ClassVar[tuple[str, ...]] = ()
    variable_image_features: ClassVar[bool] = False
    fingerprint_tensors: ClassVar[tuple[str, ...]] = ()
    lora_target_modules: ClassVar[tuple[str, ...]] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )
    image_start_token: ClassVar[str | None] = None

    def __init__(self, model: nn.Module):
        if not hasattr(model, "model") or not hasattr(model, "lm_head"):
            raise ValueError(
                f"{type(model).__name__} does not look like {self.model_class_name} (needs .model and .lm_head)"
            )
        self.model = model
        self.config = model.config

    @classmethod
    def model_class(cls):
        """The transformers class of this family (``from_pretrained`` loads its folders)."""
        import transformers

        return getattr(transformers, cls.model_class_name)

    @staticmethod
    def config_facts(config) -> dict:  # pragma: no cover - every family overrides it
        raise NotImplementedError

    # -- modules -------------------------------------------------------------------------------
    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def embed_tokens(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Token embeddings (B, L, D)."""
        return self.model.get_input_embeddings()(input_ids)

    # -- images --------------------------------------------------------------------------------
    @property
    def fixed_image_tokens(self) -> int | None:
        """The image tokens of every image where the family gives each the same N features on a
        fixed grid (LLaVA-1.5), else None (each image its own count, from the processor)."""
        if self.variable_image_features:
            return None
        return int(self.config_facts(self.config)["num_image_features"])

    def base_text_inputs(self, input_ids: torch.LongTensor) -> dict:
        """What the base's own ``forward`` / ``generate`` reads beside ``input_ids`` and
        ``attention_mask`` for a prompt that was tokenised without the processor (the processor
        gives it): none for most families; Qwen2-VL's token types on transformers 5.x."""
        return {}

    def image_inputs(self, processor, images: list) -> ImageInputs:
        """The processor's tensors for ``images`` (``pixel_values`` and the keys of
        ``image_input_keys``) and each image's token count: :func:`process_images`, the one
        image-to-tensor path of scan, eval, guarded generation, serving and the feature cache."""
        return process_images(processor, images, self.fixed_image_tokens)

    # -- vision --------------------------------------------------------------------------------
    def selected_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """One vision-tower pass over crops (n, C, H, W) -> selected features (n, N, Dv): the
        configured layer(s), concatenated, without the CLS feature for the 'default' strategy."""
        config = self.config
        layer = config.vision_feature_layer
        dtype = next(self.vision_tower.parameters()).dtype
        layers = [layer] if isinstance(layer, int) else list(layer)
        hidden = tower_hidden_states(self.vision_tower, pixel_values.to(dtype), layers)
        if config.vision_feature_select_strategy == "default":
            hidden = [h[:, 1:] for h in hidden]
        return hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1)

    def vision_features(self, pixel_values: torch.Tensor, **image_inputs):  # pragma: no cover
        raise NotImplementedError

    def as_vision_features(self, vision) -> VisionFeatures:
        if isinstance(vision, VisionFeatures):
            return vision
        raise TypeError(f"{type(self).__name__} expects VisionFeatures, got {type(vision).__name__}")

    def image_token_counts(self, vision) -> torch.LongTensor:
        """(num_images,) image tokens per image in ``input_ids``."""
        raise NotImplementedError  # pragma: no cover

    def scatter_image_embeds(self, token_embeds, image_mask, vision) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def _scatter(token_embeds: torch.Tensor, image_mask: torch.Tensor, image_embeds: torch.Tensor, detail: str):
        """Write image embeds (T, D) over the T image tokens of ``image_mask`` (B, L), in order."""
        n_tokens = int(image_mask.sum())
        if n_tokens != image_embeds.shape[0]:
            raise ValueError(f"got {image_embeds.shape[0]} image features ({detail}) but {n_tokens} image tokens in the prompt")
        mask = image_mask.to(token_embeds.device).unsqueeze(-1)
        return token_embeds.masked_scatter(mask, image_embeds.to(token_embeds.device, token_embeds.dtype))

    # -- prefix tokens and positions -------------------------------------------------------------
    def prefix_anchor(self, input_ids, image_mask, attention_mask) -> torch.LongTensor:
        """(B,) where the prefix tokens go: the first image token (before the token that opens
        its block, where the family names one in ``image_start_token``), else the first
        attended token."""
        has_image = image_mask.any(dim=1)
        anchor = torch.where(has_image, image_mask.int().argmax(dim=1), attention_mask.int().argmax(dim=1))
        if self.image_start_token is None:
            return anchor
        before = (anchor - 1).clamp(min=0)
        opens = has_image & (anchor > 0)
        opens &= input_ids.gather(1, before[:, None])[:, 0] == getattr(self.config, self.image_start_token)
        return torch.where(opens, before, anchor)

    def positions(self, llm_input_ids, attention_mask, vision=None) -> Positions:
        """1-D positions counted over attended tokens (B, L+P): left padding shifts nothing."""
        return Positions(position_ids_from_mask(attention_mask))

    # -- language model --------------------------------------------------------------------------
    def language_forward(self, inputs_embeds, attention_mask, positions=None, **kwargs) -> torch.Tensor:
        """Run the decoder and LM head on embeddings (B, L, D); returns logits (B, L, vocab).

        ``positions``: a :class:`Positions`, a position-id tensor, or None for
        :meth:`positions` from the mask (left padding does not shift positions).
        """
        return self.lm_head(self.language_hidden(inputs_embeds, attention_mask, positions, **kwargs))

    def language_hidden(self, inputs_embeds, attention_mask, positions=None, **kwargs) -> torch.Tensor:
        """The decoder alone on embeddings (B, L, D) -> final hidden states (B, L, D), before the LM head."""
        if positions is None:
            positions = self.positions(None, attention_mask)
        position_ids = positions.position_ids if isinstance(positions, Positions) else positions
        out = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        return out[0]

    def language_loss(self, inputs_embeds, attention_mask, positions, labels) -> torch.Tensor:
        """The next-token loss of :meth:`language_forward` on ``labels`` (B, L), computing logits
        only where a token is supervised (:func:`supervised_lm_loss`): what training calls."""
        return supervised_lm_loss(self.language_hidden(inputs_embeds, attention_mask, positions), labels, self.lm_head)

    def generate(self, model, inputs_embeds, attention_mask, positions: Positions | None = None, **kwargs):
        """KV-cache generation from embeddings (the base's ``generate``; 1-D positions follow the
        attention mask there, as in :meth:`positions`). Returns the new tokens (B, T_new)."""
        return model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)


__all__ = [
    "Backbone",
    "IGNORE_INDEX",
    "ImageInputs",
    "ImagePrompt",
    "PREFIX_TOKEN_ID",
    "Positions",
    "VisionFeatures",
    "causal_lm_loss",
    "supervised_lm_loss",
    "image_prompt",
    "position_ids_from_mask",
    "process_images",
]
