"""Vision-feature cache: the frozen vision tower runs once per distinct image, ever.

The vision tower is frozen in both stages, so its selected-layer features V (N, Dv) depend
only on the image, the vision tower, the feature layer / selection strategy and the image
processor. The cache stores them in safetensors shards under a *namespace* folder whose
name is a hash of everything but the image::

    <cache root>/<namespace>/identity.json          what the namespace stands for
    <cache root>/<namespace>/shard-<rank>-<id>.safetensors   {image content hash: (N, Dv)}

Families whose images give variable numbers of features (LLaVA-NeXT / OneVision tiles,
dynamic resolution: ``variable_image_features``) store, per image, the row of the
:class:`~safevlm.backbones.VisionFeatures` that the vision pass returned, each tensor under
``<hash><suffix>`` in the same shard (:func:`vision_entries`)::

    <hash>              (n_i, Dv)  the image's valid safety-side features (no padding)
    <hash>.grid         (3,)       (offset, rows, cols) of its 2-D grid (what the cabstractor pools)
    <hash>.tokens       ()         image placeholder tokens it takes in input_ids
    <hash>.base         the base projector path's input for the image (LLaVA-NeXT: its tiles)
    <hash>.meta.<name>  its row of each per-image tensor the family keeps (image_sizes...)

so a cached batch is the same :class:`VisionFeatures` as the vision pass (rows padded again
to the batch's longest). Their identity (format 2) also holds the base config's vision-side
fields (tiling grid, aspect-ratio rule): fixed-grid caches (format 1) are untouched, and no
namespace of one kind can be read as the other.

* the **namespace** hashes the vision tower's weights (names, shapes, dtypes, bytes) and
  config, the feature layer(s), the selection strategy and the image processor's settings;
  change any of them and the old entries are simply not found (a miss, never a wrong hit);
* an **entry key** is the SHA-256 of the image file's bytes (or of in-memory bytes), so
  renaming or copying an image keeps its entry and editing it invalidates it;
* shards are written to a temp name and renamed, so a kill never leaves a half shard;
  every rank of a distributed run writes its own shards, then all ranks rescan.

Training reads features with :meth:`FeatureCache.get_batch` (memory-mapped, lazily opened),
through :class:`CachedFeatureCollator`, which attaches ``vision_features`` and drops
``pixel_values`` so that :class:`~safevlm.model.SafeVLM` never calls the vision tower.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

CACHE_FORMAT = 1  # fixed-grid families: one (N, Dv) tensor per image
VARIABLE_CACHE_FORMAT = 2  # variable-length families: a VisionFeatures row per image (module docstring)
IDENTITY_NAME = "identity.json"
HASH_MEMO_NAME = "image_hashes.json"
# volatile config keys that do not change the features
_VOLATILE_KEYS = {"_name_or_path", "transformers_version", "processor_class", "_processor_class", "torch_dtype", "dtype"}


# ----------------------------------------------------------------------------------- identity
def vision_tower_fingerprint(vision_tower: torch.nn.Module) -> str:
    """SHA-256 over the vision tower's parameters and buffers (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vision_tower.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _clean(d: dict) -> dict:
    return {k: _clean(v) if isinstance(v, dict) else v for k, v in d.items() if k not in _VOLATILE_KEYS}


def cache_identity(model, image_processor) -> dict:
    """What the features depend on besides the image (the namespace is its hash).

    ``image_processor``: the processor's image processor (a whole processor is read through
    its ``image_processor``). Variable-length families add their format, family and the base
    config without its text part (where tiles are laid out, unpadded, shrunk)."""
    backbone = model.backbone
    config = backbone.config
    image_processor = getattr(image_processor, "image_processor", image_processor)
    vision_config = config.vision_config.to_dict() if hasattr(config.vision_config, "to_dict") else {}
    processor_settings = image_processor.to_dict() if hasattr(image_processor, "to_dict") else vars(image_processor)
    identity = {
        "format": CACHE_FORMAT,
        "image_loader": "safevlm.data.open_image/rgb",
        "vision_tower_sha256": vision_tower_fingerprint(backbone.vision_tower),
        "vision_config": _clean(vision_config),
        "vision_feature_layer": getattr(config, "vision_feature_layer", None),
        "vision_feature_select_strategy": getattr(config, "vision_feature_select_strategy", None),
        "image_processor": _clean(json.loads(json.dumps(processor_settings, default=str))),
    }
    if backbone.variable_image_features:
        layout = {k: v for k, v in config.to_dict().items() if k not in ("text_config", "vision_config")}
        identity.update({
            "format": VARIABLE_CACHE_FORMAT,
            "family": backbone.family,
            "base_config": _clean(json.loads(json.dumps(layout, default=str))),
        })
    return identity


def image_content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ImageHasher:
    """Content hashes of image files, memoised by (path, size, mtime) in the cache root so that
    a large dataset is read once, not on every run."""

    def __init__(self, root: str | os.PathLike | None):
        self.memo_path = Path(root) / HASH_MEMO_NAME if root is not None else None
        self.memo: dict[str, str] = {}
        self.changed = False
        if self.memo_path is not None and self.memo_path.is_file():
            try:
                self.memo = json.loads(self.memo_path.read_text())
            except (json.JSONDecodeError, OSError):
                self.memo = {}

    def hash_file(self, path: str | os.PathLike) -> str:
        path = Path(path).resolve()
        st = path.stat()
        signature = f"{path}|{st.st_size}|{st.st_mtime_ns}"
        if signature not in self.memo:
            self.memo[signature] = image_content_hash(path.read_bytes())
            self.changed = True
        return self.memo[signature]

    def save(self) -> None:
        if self.memo_path is None or not self.changed:
            return
        self.memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.memo_path.with_name(f"{HASH_MEMO_NAME}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.memo))
        os.replace(tmp, self.memo_path)
        self.changed = False


def record_image_keys(records, image_root=None, hasher: ImageHasher | None = None) -> dict[str, str]:
    """``{record.id: content hash}`` for records with an image (paths resolved safely under the root)."""
    from safevlm.data import resolve_image_path

    hasher = hasher or ImageHasher(None)
    keys = {}
    for record in records:
        image = record.image
        if image is None:
            continue
        if isinstance(image, bytes):
            keys[record.id] = image_content_hash(image)
        else:
            keys[record.id] = hasher.hash_file(resolve_image_path(image, image_root or "."))
    return keys


# ----------------------------------------------------------------------------------- the cache
class FeatureCache:
    """Features for one cache identity, stored as safetensors shards.

    Args:
        root: the cache root folder (shared by runs and stages).
        identity: what the features depend on besides the image (see :func:`cache_identity`).
    """

    def __init__(self, root: str | os.PathLike, identity: dict):
        self.root = Path(root)
        self.identity = identity
        blob = json.dumps(identity, sort_keys=True, default=str).encode()
        self.namespace = hashlib.sha256(blob).hexdigest()[:24]
        self.dir = self.root / self.namespace
        self.variable = identity.get("format") == VARIABLE_CACHE_FORMAT  # VisionFeatures rows, not (N, Dv)
        self._index: dict[str, Path] = {}
        self._suffixes: dict[str, tuple[str, ...]] = {}  # variable-length entries: their other tensors
        self._handles: dict[Path, object] = {}
        self.refresh()

    @classmethod
    def for_model(cls, root: str | os.PathLike, model, image_processor) -> "FeatureCache":
        """The cache of ``model``'s vision tower (a :class:`~safevlm.model.SafeVLM`) with this processor."""
        return cls(root, cache_identity(model, image_processor))

    # -- lookup --------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rescan the shards (after other processes wrote some). The index holds images (their
        features' key); a variable-length entry's other tensors sit in the same shard."""
        from safetensors import safe_open

        index, suffixes = {}, {}
        if self.dir.is_dir():
            for shard in sorted(self.dir.glob("shard-*.safetensors")):
                in_shard: dict[str, list[str]] = {}
                with safe_open(str(shard), framework="pt") as f:
                    for key in f.keys():
                        image, dot, rest = key.partition(".")
                        in_shard.setdefault(image, []).extend([dot + rest] if dot else [])
                for image, rest in in_shard.items():
                    if image not in index:
                        index[image], suffixes[image] = shard, tuple(sorted(rest))
        self._index, self._suffixes = index, suffixes

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [k for k in dict.fromkeys(keys) if k not in self._index]

    def _handle(self, shard: Path):
        handle = self._handles.get(shard)
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[shard] = safe_open(str(shard), framework="pt")
        return handle

    def get(self, key: str, suffix: str = "") -> torch.Tensor:
        """Features (N, Dv) of one image (variable-length entries: (n_i, Dv), or the entry's
        tensor ``suffix``, e.g. ``".grid"``); ``KeyError`` if absent."""
        shard = self._index.get(key)
        if shard is None:
            raise KeyError(f"image {key[:12]}... is not in the feature cache {self.dir}")
        return self._handle(shard).get_tensor(key + suffix)

    def image_tokens(self, key: str) -> int:
        """The image placeholder tokens of one image of a variable-length cache."""
        return int(self.get(key, ".tokens"))

    def get_batch(self, keys: list[str]):
        """Features (len(keys), N, Dv); for a variable-length cache the
        :class:`~safevlm.backbones.VisionFeatures` of these images, as the vision pass gives them."""
        if not self.variable:
            return torch.stack([self.get(k) for k in keys])
        from safevlm.backbones import VisionFeatures

        features = [self.get(k) for k in keys]  # KeyError for an image not in the cache
        layouts = {self._suffixes[k] for k in keys}
        if len(layouts) != 1:
            raise ValueError(f"the feature cache {self.dir} holds entries of different layouts {sorted(layouts)}; "
                             "delete the folder to rebuild it")
        (suffixes,) = layouts
        grids = [self.get(k, ".grid").tolist() for k in keys]
        base = tuple(self.get(k, ".base") for k in keys) if ".base" in suffixes else None
        names = [s[len(".meta."):] for s in suffixes if s.startswith(".meta.")]
        meta = {n: torch.stack([self.get(k, ".meta." + n) for k in keys]) for n in names}
        return VisionFeatures.pad(features, grids, base_inputs=base, meta=meta)

    def __getstate__(self):  # DataLoader workers reopen shards themselves
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    # -- writing -------------------------------------------------------------------------------
    def put(self, features: dict[str, torch.Tensor], rank: int = 0) -> Path | None:
        """Write one shard ``{key: (N, Dv)}`` (variable-length entries: also ``{key + suffix:
        tensor}``, see :func:`vision_entries`) atomically; returns its path."""
        from safetensors.torch import save_file

        features = {k: v for k, v in features.items() if k.split(".", 1)[0] not in self._index}
        if not features:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        identity_file = self.dir / IDENTITY_NAME
        if not identity_file.exists():
            tmp = self.dir / f"{IDENTITY_NAME}.{rank}.{uuid.uuid4().hex[:8]}.tmp"
            tmp.write_text(json.dumps(self.identity, indent=2, sort_keys=True, default=str) + "\n")
            os.replace(tmp, identity_file)
        name = f"shard-{rank:03d}-{uuid.uuid4().hex[:12]}.safetensors"
        tmp = self.dir / f".{name}.tmp"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in features.items()}, str(tmp),
                  metadata={"safevlm": "vision_features", "namespace": self.namespace})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / name)
        written: dict[str, list[str]] = {}
        for k in features:
            image, dot, rest = k.partition(".")
            written.setdefault(image, []).extend([dot + rest] if dot else [])
        for image, rest in written.items():
            self._index[image], self._suffixes[image] = self.dir / name, tuple(sorted(rest))
        return self.dir / name

    @torch.no_grad()
    def fill(
        self,
        encode: Callable[[list], torch.Tensor],
        items: list[tuple[str, object]],
        batch_size: int = 64,
        shard_size: int = 4096,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = False,
    ) -> int:
        """Compute and store the features of the items not cached yet.

        ``items`` are ``(key, image source)``; ``encode(sources)`` runs the vision tower and
        returns (B, N, Dv), or, for a variable-length cache, B entry dicts
        (:func:`vision_entries`). Rank ``r`` of ``world_size`` handles every
        ``world_size``-th missing item; call :meth:`refresh` on every rank after all ranks are
        done. Returns the number computed here.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        sources = {}
        for key, source in items:
            sources.setdefault(key, source)
        # Shares are cut from all the keys, not from what this process happens to see cached,
        # so that ranks that look at different moments still split the work without gaps.
        todo = [k for k in sorted(sources)[rank::world_size] if k not in self._index]
        pending: dict[str, torch.Tensor] = {}
        done = 0
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="caching vision features", unit="img")
        for start in range(0, len(todo), batch_size):
            keys = todo[start:start + batch_size]
            features = encode([sources[k] for k in keys])
            if len(features) != len(keys):
                raise ValueError(f"encode returned {len(features)} feature maps for {len(keys)} images")
            if isinstance(features, torch.Tensor):
                pending.update({k: f.clone() for k, f in zip(keys, features.to("cpu"), strict=True)})
            else:
                for k, entry in zip(keys, features, strict=True):
                    pending.update({k + suffix: t.to("cpu").clone() for suffix, t in entry.items()})
            done += len(keys)
            if bar is not None:
                bar.update(len(keys))
            if sum("." not in k for k in pending) >= shard_size:
                self.put(pending, rank)
                pending = {}
        if pending:
            self.put(pending, rank)
        if bar is not None:
            bar.close()
        return done


def vision_entries(vision, image_tokens: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per image of a :class:`~safevlm.backbones.VisionFeatures`, the tensors a variable-length
    cache stores under ``<key><suffix>`` (module docstring): ``""`` its valid features (n_i, Dv),
    ``".grid"`` (3,), ``".tokens"`` () from ``image_tokens`` (num_images,), ``".base"`` its base
    input (when the family keeps one per image), ``".meta.<name>"`` its row of each meta tensor."""
    entries = []
    lengths = vision.lengths.tolist()
    for i, n in enumerate(lengths):
        entry = {"": vision.features[i, :n], ".grid": vision.grids[i], ".tokens": image_tokens[i].reshape(())}
        if vision.base_inputs is not None:
            base = vision.base_inputs[i]
            if not isinstance(base, torch.Tensor):
                raise TypeError(f"the feature cache stores one tensor of base inputs per image, got {type(base).__name__}")
            entry[".base"] = base
        for name, value in vision.meta.items():
            if "." in name:
                raise ValueError(f"meta name {name!r}: the feature cache needs names without '.'")
            entry[f".meta.{name}"] = value[i]
        entries.append({k: v.detach().contiguous() for k, v in entry.items()})
    return entries


def image_encoder(model, processor, image_root=None) -> Callable[[list], torch.Tensor | list]:
    """``encode(records)``: open each record's image safely, run the processor (the one image
    path, :meth:`~safevlm.backbones.Backbone.image_inputs`: ``pixel_values`` and the family's
    other image inputs) and one vision-tower pass (no grad, eval mode). Returns (B, N, Dv) on
    fixed-grid families, B :func:`vision_entries` dicts where images differ in size.

    ``processor``: the base's processor (fixed-grid families need only its ``image_processor``)."""
    from safevlm.data import open_image

    backbone = model.backbone

    def encode(records: list):
        images = [open_image(r, image_root) for r in records]
        inputs = backbone.image_inputs(processor, images)
        tower = backbone.vision_tower
        was_training = tower.training
        tower.eval()
        try:
            device = next(tower.parameters()).device
            vision = model.encode_images(**inputs.to(device).tensors)
        finally:
            tower.train(was_training)
        if isinstance(vision, torch.Tensor):
            return vision
        return vision_entries(vision, backbone.image_token_counts(vision))

    return encode


class CachedFeatureCollator:
    """Batches from cached features: ``vision_features`` (B, N, Dv), or the
    :class:`~safevlm.backbones.VisionFeatures` of a variable-length cache, instead of
    ``pixel_values`` (and the family's other image inputs).

    Text goes through the wrapped :class:`~safevlm.data.SafetyCollator`'s ``encode`` (the same
    chat template, image-token expansion and assistant-only labels), memoised per record, so a
    warm epoch neither decodes an image, nor runs the vision tower, nor re-renders a template.

    Args:
        collator: a ``SafetyCollator``.
        cache: the filled :class:`FeatureCache`.
        keys: ``{record.id: image content hash}`` (see :func:`record_image_keys`).
        num_image_tokens: image placeholder tokens per image: ``SafetyConfig.num_image_features``
            when the LLM runs on a fixed-grid family; None when the LLM runs on a
            variable-length one (each image's own count, stored with its entry); 1 when the LLM
            does not run (stage 1 with ``w_lm = 0``), since the head masks image placeholders out
            and nothing else reads them, so the head's output is the same and its keys are
            N - 1 fewer per sample.

    Each batch also carries the ``prompt_mask`` of the plain collator (the tokens the head
    reads), so the head reads the same tokens cached and uncached.
    """

    def __init__(self, collator, cache: FeatureCache, keys: dict[str, str], num_image_tokens: int | None):
        self.collator = collator
        self.cache = cache
        self.keys = keys
        self.num_image_tokens = num_image_tokens
        self._encoded: dict[str, tuple] = {}

    def _encode(self, record) -> tuple:
        import numpy as np

        hit = self._encoded.get(record.id)
        if hit is None:
            count = self.num_image_tokens
            if count is None:
                if not self.cache.variable:
                    raise ValueError("num_image_tokens=None (each image's own count) needs a variable-length cache")
                count = self.cache.image_tokens(self.keys[record.id])
            e = self.collator.encode(record, count)
            hit = self._encoded[record.id] = (
                np.asarray(e["input_ids"], dtype=np.int64), np.asarray(e["labels"], dtype=np.int64),
                np.asarray(e["prompt_mask"], dtype=bool),
            )
        return hit

    def token_length(self, record) -> int:
        """Token length of ``record`` as this collator encodes it (encoded once, kept)."""
        return len(self._encode(record)[0])

    def __call__(self, records: list) -> dict:
        from safevlm.data.collator import decision_tensors

        if not records:
            raise ValueError("cannot collate an empty batch")
        missing = [r.id for r in records if r.id not in self.keys]
        if missing:
            raise ValueError(f"records {missing[:3]} have no image; training with the feature cache needs one image per record")
        encoded = [self._encode(r) for r in records]
        tokenizer = self.collator.tokenizer
        length = max(len(ids) for ids, _, _ in encoded)
        left = tokenizer.padding_side == "left"
        input_ids = torch.full((len(records), length), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(records), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(records), length), dtype=torch.long)
        prompt_mask = torch.zeros((len(records), length), dtype=torch.bool)
        for b, (ids, lab, prompt) in enumerate(encoded):
            cols = slice(length - len(ids), length) if left else slice(0, len(ids))
            input_ids[b, cols] = torch.from_numpy(ids)
            labels[b, cols] = torch.from_numpy(lab)
            prompt_mask[b, cols] = torch.from_numpy(prompt)
            attention_mask[b, cols] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "prompt_mask": prompt_mask,
            "risk_level": torch.tensor([r.risk_level for r in records], dtype=torch.long),
            "risk_type": torch.tensor([r.risk_type for r in records], dtype=torch.long),
            "vision_features": self.cache.get_batch([self.keys[r.id] for r in records]),
            **decision_tensors(records),
        }


__all__ = [
    "CachedFeatureCollator",
    "FeatureCache",
    "ImageHasher",
    "cache_identity",
    "image_content_hash",
    "image_encoder",
    "record_image_keys",
    "vision_entries",
    "vision_tower_fingerprint",
]
