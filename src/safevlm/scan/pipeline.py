"""The scan loop: items -> DataLoader workers (read, hash, decode, preprocess, tokenise) ->
one vision pass + safety projector + head per batch -> the policy -> rows appended per batch.

The language model never runs (guard mode, :meth:`safevlm.model.SafeVLM.guard`). Items with
the same image bytes and prompt are scanned once: the later ones get the first one's result
and ``status: duplicate``. A killed scan rerun with ``resume=True`` skips every id already in
``scan.jsonl`` / ``failed.jsonl`` (see :mod:`safevlm.scan.outputs`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from safevlm.data.images import ImageError, ImageTooLarge, decode_image
from safevlm.errors import UsageError
from safevlm.scan.outputs import (
    CONFIG_FILE,
    FAILED_FILE,
    RESULT_FIELDS,
    SCAN_FILE,
    SUMMARY_FILE,
    AppendFile,
    dedupe_key,
    read_row_at,
    read_state,
    write_json_atomic,
)
from safevlm.scan.sources import Item, enumerate_inputs, listing_summary, read_item

logger = logging.getLogger("safevlm.scan")

CONFIG_VERSION = 1
# options that decide which items a scan covers and what their results are: a resumed scan
# must use the same ones (batch size, workers, device may change between runs)
IDENTITY_FIELDS = ("inputs", "format", "images", "prompt", "prompt_field", "image_field", "model", "adapter",
                   "policy", "threshold", "shard")


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ScanOptions:
    """What to scan and how; the CLI flags of ``safevlm scan`` map one to one onto these fields."""

    inputs: list[str] = _help("Image folders, data files, parquet / datasets folders, WebDataset shards.")
    out: str = _help("Output folder (scan.jsonl, failed.jsonl, summary.json, report.html).")
    model: str = _help("Base model folder or tiny:<preset>[@seed].")
    adapter: str | None = _help("Safety adapter folder (without one the head is untrained).", default=None)
    policy: str = _help("Policy name or YAML file: decides each item's action.", default="default")
    format: str | None = _help("Input format for every input; detected per input when None.", default=None)
    images: str | None = _help("Image root of conversation files (default: the file's folder).", default=None)
    prompt: str | None = _help("One prompt for every item (default: each item's own, or none).", default=None)
    prompt_field: str | None = _help("Column (parquet, hf) or member extension (webdataset) holding the prompt.",
                                     default=None)
    image_field: str | None = _help("Image column of parquet / hf inputs (default: detected).", default=None)
    batch_size: int = _help("Items per vision pass.", default=32)
    num_workers: int | None = _help("DataLoader workers decoding images (default: min(8, CPUs - 1)).", default=None)
    resume: bool = _help("Continue the scan in `out`, skipping items already written.", default=False)
    shard: tuple[int, int] = _help("(I, N): scan the items whose index % N == I.", default=(0, 1))
    limit: int | None = _help("Scan only the first N items of this shard.", default=None)
    threshold: float | None = _help("Flag items with risk_score >= this instead of the policy's refusals.",
                                    default=None)
    device: str | None = _help("Device (default: cuda if available).", default=None)
    dtype: str = _help("Weights dtype (auto: bfloat16 on GPUs that support it, float32 on CPU).", default="auto")
    allow_base_mismatch: bool = _help("Load an adapter trained on a base with other weights.", default=False)
    report: bool = _help("Write report.html at the end.", default=True)
    report_top: int = _help("Thumbnails per risk type in the report.", default=12)
    progress: bool = _help("Show a progress bar on stderr.", default=True)

    def __post_init__(self):
        self.inputs = [str(i) for i in self.inputs]
        self.shard = tuple(int(x) for x in self.shard)
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise UsageError(f"--num-workers must be >= 0, got {self.num_workers}")
        index, count = self.shard
        if count < 1 or not 0 <= index < count:
            raise UsageError(f"--shard must be I/N with 0 <= I < N, got {index}/{count}")
        if self.limit is not None and self.limit < 0:
            raise UsageError(f"--limit must be >= 0, got {self.limit}")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise UsageError(f"--threshold must be in (0, 1], got {self.threshold}")
        if self.prompt is not None and self.prompt_field is not None:
            raise UsageError("give --prompt (one prompt for all) or --prompt-field (each item's own), not both")
        if self.report_top < 1:
            raise UsageError(f"--report-top must be >= 1, got {self.report_top}")

    def identity(self) -> dict:
        return {name: (list(v) if isinstance(v := getattr(self, name), tuple) else v) for name in IDENTITY_FIELDS}

    def workers(self) -> int:
        if self.num_workers is not None:
            return self.num_workers
        return max(0, min(8, (os.cpu_count() or 1) - 1))


# -- preparing items (DataLoader workers) ------------------------------------------------------------------
def failure_reason(err: BaseException) -> str:
    """A short reason code for ``failed.jsonl``: missing, empty, not_an_image, corrupt,
    too_large, unreadable."""
    if isinstance(err, FileNotFoundError):
        return "missing"
    if isinstance(err, ImageTooLarge):
        return "too_large"
    text = str(err)
    if "missing image" in text:
        return "missing"
    if "empty" in text:
        return "empty"
    if "not an image" in text:
        return "not_an_image"
    if "truncated" in text or "corrupt" in text:
        return "corrupt"
    return "unreadable"


@dataclass
class Prepared:
    """An item after the worker: ``error`` (reason, message) or the facts of its image and the
    tokens of its prompt (``encoded`` None: the head reads the image alone)."""

    error: tuple[str, str] | None = None
    sha256: str | None = None
    nbytes: int | None = None
    width: int | None = None
    height: int | None = None
    prompt: str | None = None
    encoded: object | None = None
    pixel_row: int | None = None


class ItemBatches:
    """A map-style dataset whose element ``b`` is batch ``b``, fully prepared: what each
    DataLoader worker does (read, sha256, decode with the one image opener, one processor call
    over the batch's images, chat template + tokenizer). Returns ``{"prepared": [Prepared],
    "image_inputs": ImageInputs or None}``: the processor's tensors (``pixel_values`` and the
    family's other image keys, ``image_sizes``...), one image row per item whose image decoded
    (``Prepared.pixel_row``).

    ``num_image_tokens``: every image's token count where the family's is fixed
    (``model.backbone.fixed_image_tokens``, LLaVA-1.5: only the image processor runs); None
    where each image has its own (tiled / dynamic-resolution families: the processor says).
    """

    def __init__(self, batches: list[list[Item]], processor, num_image_tokens: int | None,
                 prompt: str | None = None):
        self.batches = batches
        self.processor = processor
        self.num_image_tokens = num_image_tokens
        self.prompt = prompt

    def __len__(self) -> int:
        return len(self.batches)

    def prepare(self, item: Item, images: list) -> Prepared:
        """Read and decode one item (its image appended to ``images``); the prompt is tokenised
        by :meth:`finish`, once the image's token count is known."""
        if item.error is not None:
            return Prepared(error=item.error)
        try:
            data, prompt = read_item(item)
        except FileNotFoundError:
            return Prepared(error=("missing", f"missing image file: {item.source}"))
        except OSError as err:
            return Prepared(error=("unreadable", f"cannot read {item.source}: {err.strerror or err}"))
        except ImageError as err:
            return Prepared(error=(failure_reason(err), _naming(str(err), item)))
        if self.prompt is not None:
            prompt = self.prompt
        prep = Prepared(prompt=prompt)
        if data is not None:
            prep.sha256, prep.nbytes = hashlib.sha256(data).hexdigest(), len(data)
            try:
                image = decode_image(data)
            except ImageError as err:
                message = str(err).replace(f"{len(data)} bytes of image data", item.source)
                return Prepared(error=(failure_reason(err), _naming(message, item)))
            prep.width, prep.height = image.size
            prep.pixel_row = len(images)
            images.append(image)
        elif prompt is None:
            return Prepared(error=("no_image", f"the item has neither an image nor a prompt: {item.source}"))
        return prep

    def finish(self, prepared: list[Prepared], images: list):
        """One processor call over ``images`` (the one image path:
        :func:`safevlm.backbones.process_images`), then each prompt tokenised with its own
        image's token count. Returns the :class:`~safevlm.backbones.ImageInputs` (None without images)."""
        from safevlm.backbones import process_images
        from safevlm.data.chat import build_messages, encode_chat

        inputs = process_images(self.processor, images, self.num_image_tokens) if images else None
        for prep in prepared:
            if prep.error is not None or prep.prompt is None:
                continue
            with_image = prep.pixel_row is not None
            messages = build_messages(prep.prompt, with_image)
            count = inputs.num_tokens[prep.pixel_row] if with_image else 1
            prep.encoded = encode_chat(self.processor, messages, count, add_generation_prompt=True)
        return inputs

    def __getitem__(self, b: int) -> dict:
        images: list = []
        prepared = [self.prepare(item, images) for item in self.batches[b]]
        return {"prepared": prepared, "image_inputs": self.finish(prepared, images)}


def _naming(message: str, item: Item) -> str:
    """``message`` ending with the item's source unless it names it already."""
    return message if item.source in message else f"{message}: {item.source}"


def _no_collate(batch):
    return batch


def make_loader(dataset: ItemBatches, num_workers: int, pin_memory: bool = False):
    """The DataLoader over prepared batches (in order; ``num_workers`` processes decode)."""
    from torch.utils.data import DataLoader

    extra = {"prefetch_factor": 4} if num_workers > 0 else {}
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_no_collate,
                      pin_memory=pin_memory, **extra)


# -- the guard on a batch -------------------------------------------------------------------------------------
def encode_rows(model, image_inputs, rows: list[int]):
    """The vision features of images ``rows`` of ``image_inputs`` (an
    :class:`~safevlm.backbones.ImageInputs`), one vision pass: over those images alone where the
    tensors hold one row per image, else (a family that concatenates its images' patches) over
    all of them, keeping the rows' features."""
    import torch

    device = model.device
    every = rows == list(range(len(image_inputs.num_tokens)))
    inputs = image_inputs if every or not image_inputs.per_image_rows else image_inputs.select(rows)
    features = model.encode_images(**{k: v.to(device, non_blocking=True) for k, v in inputs.tensors.items()})
    if inputs is image_inputs and not every:
        features = features.index_select(0, torch.tensor(rows, device=features.device))
    return features


def run_guard(model, processor, prepared: list[Prepared], image_inputs, features=None):
    """Risk probabilities for prepared items: one vision pass over ``image_inputs`` (an
    :class:`~safevlm.backbones.ImageInputs` from :meth:`ItemBatches.finish`, image rows named
    by ``Prepared.pixel_row``; or ``features``, that pass done already, one row per item with
    an image, in order), then the head per group (image + prompt, image alone, prompt
    alone). Returns level_probs (n, num_levels), type_probs (n, num_types) as float32 CPU
    tensors and ``{position: error message}`` for groups whose head raised (fail closed)."""
    import torch

    from safevlm.guarded import pad_left

    n = len(prepared)
    level = torch.full((n, model.config.num_levels), float("nan"))
    types = torch.full((n, model.config.num_types), float("nan"))
    errors: dict[int, str] = {}
    if n == 0:
        return level, types, errors
    with torch.inference_mode():
        rows = [p.pixel_row for p in prepared if p.pixel_row is not None]
        if rows and features is None:
            features = encode_rows(model, image_inputs, rows)
        position_row = {pos: r for r, pos in enumerate(i for i, p in enumerate(prepared) if p.pixel_row is not None)}
        groups: dict[str, list[int]] = {}
        for pos, p in enumerate(prepared):
            key = ("image" if p.pixel_row is not None else "text") + ("+prompt" if p.encoded is not None else "")
            groups.setdefault(key, []).append(pos)
        for key, idx in groups.items():
            try:
                feats = None
                if key.startswith("image"):
                    select = torch.tensor([position_row[i] for i in idx], device=features.device)
                    feats = features if len(idx) == features.shape[0] else features.index_select(0, select)
                if key.endswith("+prompt"):
                    input_ids, attention_mask, prompt_mask = pad_left(model, processor, [prepared[i].encoded for i in idx])
                    out = model.guard(input_ids, attention_mask=attention_mask, vision_features=feats,
                                      prompt_mask=prompt_mask)
                else:
                    out = model.guard(None, vision_features=feats)
                level[idx] = out.level_probs.float().cpu()
                types[idx] = out.type_probs.float().cpu()
            except Exception as err:  # fail closed: a broken head must not pass an item as safe
                logger.exception("safety head failed on %d item(s)", len(idx))
                for i in idx:
                    errors[i] = f"safety head raised {type(err).__name__}: {err}"
    return level, types, errors


def _round(x: float) -> float | None:
    return round(float(x), 6) if x == x and abs(x) != float("inf") else None


def result_fields(decision, taxonomy, threshold: float | None) -> dict:
    """The result part of a row from a policy decision: action, level and type, ``risk_score``
    (P(level >= 1)), ``flagged`` (refused, or risk_score >= threshold when one is set), the
    probabilities."""
    level_probs = [_round(p) for p in decision.level_probs]
    valid = decision.error is None and level_probs and level_probs[0] is not None
    risk_score = _round(1.0 - float(decision.level_probs[0])) if valid else None
    if threshold is None or risk_score is None:
        flagged = decision.action == "refuse"
    else:
        flagged = risk_score >= threshold
    level = decision.risk_level
    return {
        "action": decision.action,
        "risk_level": level,
        "risk_level_name": taxonomy.level_names[level] if 0 <= level < taxonomy.num_levels else "unknown",
        "risk_type": decision.risk_type,
        "risk_score": risk_score,
        "flagged": flagged,
        "decided_by": decision.decided_by,
        "score": None if decision.score is None else _round(decision.score),
        "level_probs": level_probs,
        "type_probs": {name: _round(p) for name, p in decision.type_probs},
        "error": decision.error,
    }


def _item_fields(item: Item, prep: Prepared | None = None) -> dict:
    row = {"id": item.id, "index": item.index, "input": item.input, "source": item.source}
    if prep is not None:
        row.update({"prompt": prep.prompt, "width": prep.width, "height": prep.height, "bytes": prep.nbytes,
                    "sha256": prep.sha256})
    return row


# -- output folder --------------------------------------------------------------------------------------------
def prepare_out(options: ScanOptions, config: dict) -> Path:
    """Create ``out`` or check it holds the same scan (``--resume``); writes scan_config.json."""
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; give a folder")
    config_path = out / CONFIG_FILE
    if config_path.is_file():
        import json

        try:
            old = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UsageError(f"{config_path}: not valid JSON ({err.msg}); the scan folder is damaged") from None
        if not options.resume:
            raise UsageError(f"--out {str(out)!r} holds a scan already; pass --resume to continue it, or choose another --out")
        for key in IDENTITY_FIELDS:
            if old.get("options", {}).get(key) != config["options"][key]:
                raise UsageError(
                    f"--resume: {key} differs from the scan in {str(out)!r} "
                    f"({old.get('options', {}).get(key)!r} there, {config['options'][key]!r} now); "
                    "a resumed scan must read the same inputs with the same model and policy"
                )
    elif out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {str(out)!r} exists and is not empty (no {CONFIG_FILE}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config_path, config)
    return out


@dataclass
class ScanResult:
    """What :func:`run_scan` did: the summary (also in summary.json), the output folder, the
    report's path (or None), the number of items processed in this run, the model's taxonomy."""

    summary: dict
    out: Path
    report: Path | None
    processed: int
    taxonomy: object = None


def shard_items(items: list[Item], shard: tuple[int, int], limit: int | None) -> list[Item]:
    index, count = shard
    chosen = [item for item in items if item.index % count == index]
    return chosen if limit is None else chosen[:limit]


def run_scan(options: ScanOptions, model=None, processor=None) -> ScanResult:
    """Scan ``options.inputs`` into ``options.out`` (see the module docstring).

    ``model``, ``processor``: an already loaded SafeVLM and its processor (default: loaded
    with :func:`safevlm.loading.load_model_and_processor` from ``options.model`` /
    ``options.adapter``).
    """
    import torch

    from safevlm.policy import load_policy

    listings = enumerate_inputs(options.inputs, options.format, options.images, options.prompt_field,
                                options.image_field)
    items = shard_items([it for li in listings for it in li.items], options.shard, options.limit)
    policy = load_policy(options.policy)
    if model is None:
        from safevlm.loading import load_model_and_processor

        model, processor = load_model_and_processor(options.model, options.adapter, device=options.device,
                                                    dtype=options.dtype, allow_base_mismatch=options.allow_base_mismatch)
    taxonomy = model.config.taxonomy
    if policy.taxonomy != taxonomy:
        raise UsageError(f"the policy's risk types {list(policy.taxonomy.type_names)} differ from the model's "
                         f"{list(taxonomy.type_names)}")
    listing = listing_summary(listings)
    config = {"version": CONFIG_VERSION, "options": options.identity(), "listing": listing,
              "items_in_shard": len(items), "policy_name": policy.name}
    out = prepare_out(options, config)
    state = read_state(out)
    todo = [item for item in items if item.id not in state.done]

    workers = options.workers()
    device = model.backbone.lm_head.weight.device
    batches = [todo[i:i + options.batch_size] for i in range(0, len(todo), options.batch_size)]
    dataset = ItemBatches(batches, processor, model.backbone.fixed_image_tokens, options.prompt)
    loader = make_loader(dataset, min(workers, len(batches)), pin_memory=device.type == "cuda")
    scan_file, failed_file = AppendFile(out / SCAN_FILE), AppendFile(out / FAILED_FILE)
    bar = _progress(len(todo), options.progress)
    processed = flagged = failed = 0
    start = time.perf_counter()
    try:
        for batch_items, payload in zip(batches, loader):
            rows, failed_rows = scan_batch(model, processor, policy, batch_items, payload, state, out,
                                           options.threshold)
            offsets = scan_file.append(rows)
            failed_file.append(failed_rows)
            for row, offset in zip(rows, offsets):  # only now: a kill before the write rescans these
                state.done.add(row["id"])
                if row["status"] == "scanned":
                    state.originals.setdefault(dedupe_key(row["sha256"], row["prompt"]), offset)
            state.done.update(r["id"] for r in failed_rows)
            processed += len(batch_items)
            flagged += sum(bool(r["flagged"]) for r in rows)
            failed += len(failed_rows)
            if bar is not None:
                bar.update(len(batch_items))
                bar.set_postfix(flagged=flagged, failed=failed, refresh=False)
    finally:
        scan_file.close()
        failed_file.close()
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rate = processed / elapsed if processed and elapsed > 0 else _previous_rate(out)
    result = finish(out, model, processor, options, taxonomy, listing, rate, elapsed, policy.name,
                    items=[it for li in listings for it in li.items])
    result.processed = processed
    return result


def scan_batch(model, processor, policy, batch_items: list[Item], payload: dict, state, out: Path,
               threshold: float | None) -> tuple[list[dict], list[dict]]:
    """Rows (scan.jsonl) and failed rows (failed.jsonl) of one prepared batch, in item order."""
    prepared: list[Prepared] = payload["prepared"]
    run_positions: list[int] = []
    copies: dict[int, tuple[str, int]] = {}  # position -> ("offset", byte offset) | ("position", p)
    first_in_batch: dict[bytes, int] = {}
    for pos, prep in enumerate(prepared):
        if prep.error is not None:
            continue
        key = dedupe_key(prep.sha256, prep.prompt)
        if key in state.originals:
            copies[pos] = ("offset", state.originals[key])
        elif key in first_in_batch:
            copies[pos] = ("position", first_in_batch[key])
        else:
            first_in_batch[key] = pos
            run_positions.append(pos)
    to_run = [prepared[p] for p in run_positions]
    level, types, errors = run_guard(model, processor, to_run, payload["image_inputs"])
    results: dict[int, dict] = {}
    valid = [k for k in range(len(to_run)) if k not in errors]
    decisions = policy.decide_batch(level[valid], types[valid]) if valid else []
    for k, decision in zip(valid, decisions):
        results[run_positions[k]] = result_fields(decision, model.config.taxonomy, threshold)
    for k, message in errors.items():
        results[run_positions[k]] = result_fields(policy.error_decision(message), model.config.taxonomy, threshold)
    rows, failed_rows = [], []
    for pos, (item, prep) in enumerate(zip(batch_items, prepared)):
        if prep.error is not None:
            reason, message = prep.error
            failed_rows.append({**_item_fields(item), "reason": reason, "error": message})
            continue
        row = {**_item_fields(item, prep)}
        if pos in results:
            row.update(status="scanned", duplicate_of=None, **results[pos])
        else:
            how, where = copies[pos]
            original = read_row_at(out / SCAN_FILE, where) if how == "offset" else None
            if original is None:
                original = {"id": batch_items[where].id, **results[where]}
            row.update(status="duplicate", duplicate_of=original["id"],
                       **{k: original.get(k) for k in RESULT_FIELDS})
        rows.append(row)
    return rows, failed_rows


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="scan", dynamic_ncols=True, smoothing=0.1, mininterval=0.5)


def _previous_rate(out: Path) -> float:
    import json

    try:
        return float(json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8")).get("images_per_second", 0.0))
    except (OSError, ValueError):
        return 0.0


def finish(out: Path, model, processor, options: ScanOptions, taxonomy, listing: dict, rate: float,
           elapsed: float, policy_name: str, per_shard: list | None = None, items: list[Item] | None = None
           ) -> ScanResult:
    """summary.json and report.html from the rows in ``out`` (``items``: the inputs' items,
    listed again for the report's thumbnails when not given)."""
    from safevlm.scan.outputs import summarize

    summary, report_data = summarize(out, taxonomy, options.report_top, listing)
    summary.update({
        "images_per_second": round(rate, 3),
        "elapsed_s": round(elapsed, 3),
        "shard": f"{options.shard[0]}/{options.shard[1]}",
        "model": options.model,
        "adapter": options.adapter,
        "policy": policy_name,
        "threshold": options.threshold,
        "flagged_means": "risk_score >= threshold" if options.threshold is not None else "action == refuse",
    })
    if per_shard is not None:
        summary["per_shard"] = per_shard
    report_path = None
    if options.report:
        from safevlm.scan.report import write_report

        report_path = write_report(out, summary, report_data, model, processor, options, items)
        summary["report"] = str(report_path)
    write_json_atomic(out / SUMMARY_FILE, summary)
    return ScanResult(summary=summary, out=out, report=report_path, processed=0, taxonomy=taxonomy)


def options_from_config(config: dict, **overrides) -> ScanOptions:
    """The :class:`ScanOptions` a scan folder's scan_config.json was written with (merge, report)."""
    known = {f.name for f in fields(ScanOptions)}
    values = {k: v for k, v in config.get("options", {}).items() if k in known}
    values.update(overrides)
    return ScanOptions(**values)


__all__ = [
    "IDENTITY_FIELDS",
    "ItemBatches",
    "Prepared",
    "ScanOptions",
    "ScanResult",
    "encode_rows",
    "failure_reason",
    "finish",
    "make_loader",
    "options_from_config",
    "prepare_out",
    "result_fields",
    "run_guard",
    "run_scan",
    "scan_batch",
    "shard_items",
]
