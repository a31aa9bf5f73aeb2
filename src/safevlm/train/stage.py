"""Run one training stage: model -> data -> feature cache -> Trainer -> adapter.

:func:`run_stage` is the single entry point, for the CLI (``safevlm train --config``) and for
Python callers that already hold a model, a processor and records (the demo)::

    from safevlm.train import TrainConfig, run_stage
    result = run_stage(TrainConfig.from_yaml("configs/tiny_stage1.yaml"))
    result.adapter_dir, result.metrics["eval_type_macro_f1"]

Stage 1 freezes the whole base and trains the safety projector, head (with its queries) and
prefix tokens on ``w_cls·(CE_level + CE_type) + w_lm·LM``; with ``w_lm = 0`` the LLM never
runs (and the prefix tokens, which only the LLM reads, are left as they are). Stage 2 adds
LoRA (peft) on the language model's linear layers and trains on ``LM + w_cls·(CE_level +
CE_type)``, with the safety modules trained or frozen per the recipe.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from safevlm.bases import parse_tiny_spec  # noqa: F401 - re-exported (tiny:<preset> specs)
from safevlm.train.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)

CONFIG_COPY_NAME = "train_config.yaml"


@dataclass
class StageResult:
    """What a stage produced.

    Attributes:
        stage: 1 or 2.
        output_dir: the run folder (checkpoints, ``metrics.jsonl``, ``loss.png``).
        adapter_dir: the final adapter (``safety_config.json``, ``safety_model.safetensors``,
            ``lora/`` after stage 2).
        metrics: final validation metrics (``eval_loss``, ``eval_{level,type}_{accuracy,macro_f1}``);
            empty without validation data.
        train_metrics: the Trainer's summary (``train_loss``, ``train_runtime``, ...).
        global_step: optimizer steps done (including those before a resume).
        resumed_from: the checkpoint the run continued from, if any.
        cache: ``{"dir", "namespace", "computed", "entries"}`` when the feature cache is on.
        model: the trained :class:`~safevlm.model.SafeVLM` (in eval mode).
    """

    stage: int
    output_dir: Path
    adapter_dir: Path
    metrics: dict = field(default_factory=dict)
    train_metrics: dict = field(default_factory=dict)
    global_step: int = 0
    resumed_from: Path | None = None
    cache: dict | None = None
    model: nn.Module | None = field(default=None, repr=False)


# ------------------------------------------------------------------------------------ model
def load_base(config: TrainConfig):
    """(base model, processor) named by ``config.model.base`` / ``config.model.processor``, through
    :func:`safevlm.bases.load_base`: kept on the CPU (the Trainer places it), in the dtype that
    ``model.torch_dtype`` means on the device training runs on."""
    from safevlm.devices import resolve_device
    from safevlm.bases import load_base as load, resolve_dtype

    spec = config.model.base
    if not spec:
        raise ConfigError("model.base is not set: name a base model folder or tiny:<preset>")
    dtype = resolve_dtype(config.model.torch_dtype, resolve_device(None))
    return load(spec, dtype=dtype, device="cpu", processor=config.model.processor)


def build_model(config: TrainConfig, base: nn.Module) -> nn.Module:
    """A SafeVLM around ``base``: fresh safety modules from ``model.safety``, or the adapter's
    (checked against the base first: shapes, then weights, see :mod:`safevlm.loading`).

    A stage-2 adapter's LoRA is loaded trainable when continuing stage 2.
    """
    from transformers import set_seed

    from safevlm.model import LORA_DIR, SafeVLM

    set_seed(config.seed)  # safety-module initialisation is part of the run's determinism
    adapter = config.model.adapter
    if adapter is None:
        return SafeVLM.from_pretrained(base, trainable=True, **config.model.safety)
    if config.stage == 1 and (Path(adapter) / LORA_DIR).is_dir():
        raise ConfigError(f"model.adapter {adapter} has a LoRA adapter (stage 2); stage 1 starts before LoRA")
    return SafeVLM.from_pretrained(base, adapter, trainable=True, allow_base_mismatch=config.model.allow_base_mismatch)


def language_model_prefix(model) -> str:
    """Qualified name of the language model inside the (unwrapped) base model."""
    inner = model.backbone.model
    target = model.backbone.language_model
    for name, module in inner.named_modules():
        if module is target:
            return name
    raise ValueError("cannot locate the language model inside the base model")  # pragma: no cover


def lora_target_regex(model, target_modules: str | list[str]) -> str:
    """A peft ``target_modules`` regex matching linear layers of the language model only
    (never the vision tower, the base projector or the LM head)."""
    prefix = language_model_prefix(model)
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.backbone.language_model.named_modules() if isinstance(m, nn.Linear)})
    if target_modules == "all-linear":
        chosen = names
    else:
        unknown = sorted(set(target_modules) - set(names))
        if unknown:
            raise ConfigError(f"lora.target_modules {unknown} are not linear layers of the language model; available: {names}")
        chosen = sorted(set(target_modules))
    if not chosen:
        raise ConfigError("the language model has no linear layers to put LoRA on")
    return rf"{re.escape(prefix)}\..*\.({'|'.join(map(re.escape, chosen))})"


def add_lora(model, config: TrainConfig) -> None:
    """Wrap ``model.base_model`` with peft LoRA on the language model (no-op if it has LoRA)."""
    if hasattr(model.base_model, "peft_config"):
        return
    from peft import LoraConfig, get_peft_model

    from safevlm.compat import quiet_loading

    lora = config.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_regex(model, lora.target_modules),
        bias="none",
    )
    with quiet_loading():  # peft reads a property 5.x deprecated: a warning we cannot act on
        model.base_model = get_peft_model(model.base_model, peft_config)


def prepare_model(model, config: TrainConfig):
    """Add LoRA (stage 2) and set which parameters train in this stage (:mod:`safevlm.train.trainable`)."""
    from safevlm.train.trainable import set_trainable, stage_parts

    if config.stage == 1:
        if hasattr(model.base_model, "peft_config"):
            raise ConfigError("stage 1 got a model with LoRA layers; stage 1 runs on the plain base")
    else:
        add_lora(model, config)
        if config.model.gradient_checkpointing:
            model.backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # With w_lm = 0 the LLM is never run, so the prefix tokens (read only by the LLM) get no gradient.
    set_trainable(model, stage_parts(config.stage, config.model.safety_modules, train_prefix=config.loss.lm_weight > 0))
    return model


# ------------------------------------------------------------------------------------ data
def load_stage_data(config: TrainConfig, taxonomy, is_main_process: bool = True, wait=lambda: None):
    """(train records, val records, image root) from ``config.data``."""
    from safevlm.data import load_records

    data = config.data
    train_path, val_path = data.train, data.val
    if data.synthetic is not None:
        syn = data.synthetic
        root = Path(syn.dir)
        if is_main_process:
            ensure_synthetic_dataset(root, syn)
        wait()
        train_path, val_path = str(root / "train.jsonl"), str(root / "val.jsonl")
    if train_path is None:
        raise ConfigError("data.train is not set (or set data.synthetic)")
    image_root = data.image_root
    if image_root is None:
        image_root = str(Path(train_path).parent)
        if val_path is not None and Path(val_path).parent.resolve() != Path(train_path).parent.resolve():
            raise ConfigError("data.val is in another folder than data.train; set data.image_root for both")

    def load(path):
        report = load_records(path, format=data.format, image_root=image_root, check_images=data.check_images,
                              taxonomy=taxonomy)
        if report.skipped:
            logger.warning("%s: skipped %d of %d records (first: %s: %s)", path, len(report.skipped), report.total,
                           report.skipped[0].location, report.skipped[0].reason)
        if not report.records:
            raise ValueError(f"{path}: no usable records ({len(report.skipped)} skipped)")
        return report.records

    return load(train_path), (load(val_path) if val_path else []), image_root


def ensure_synthetic_dataset(root: Path, syn) -> None:
    """Generate the synthetic dataset once; refuse to silently reuse one made with other settings."""
    import json

    from safevlm.data.synth import make_synthetic_dataset

    meta = root / "synth.json"
    wanted = {"n": syn.n, "seed": syn.seed, "clean_ratio": syn.clean_ratio, "image_size": syn.image_size,
              "multi_turn_ratio": syn.multi_turn_ratio}
    if meta.is_file() and (root / "train.jsonl").is_file():
        have = json.loads(meta.read_text())
        if all(have.get(k) == v for k, v in wanted.items()):
            return
        raise ConfigError(
            f"{root} holds a synthetic dataset made with other settings "
            f"({ {k: have.get(k) for k in wanted} }); delete it or set data.synthetic.dir elsewhere"
        )
    logger.info("writing synthetic dataset (%d samples) to %s", syn.n, root)
    make_synthetic_dataset(root, n=syn.n, seed=syn.seed, clean_ratio=syn.clean_ratio, image_size=syn.image_size,
                           multi_turn_ratio=syn.multi_turn_ratio)


# ------------------------------------------------------------------------------------ trainer
def training_arguments(config: TrainConfig, has_val: bool, quiet: bool = False):
    """The Trainer's arguments for ``config`` (``quiet``: no progress bar)."""
    from safevlm.compat import training_arguments as make_training_arguments

    o, log = config.optim, config.log

    def strategy(steps: int, enabled: bool = True) -> tuple[str, int | None]:
        if steps == 0 or not enabled:
            return "no", None
        return ("epoch", None) if steps == -1 else ("steps", steps)

    eval_strategy, eval_steps = strategy(log.eval_steps, has_val)
    save_strategy, save_steps = strategy(log.save_steps)
    scheduler = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[o.scheduler]
    kwargs = {}
    if eval_steps is not None:
        kwargs["eval_steps"] = eval_steps
    if save_steps is not None:
        kwargs["save_steps"] = save_steps
    return make_training_arguments(
        output_dir=str(config.output_dir),
        seed=config.seed,
        data_seed=config.seed,
        per_device_train_batch_size=o.batch_size,
        per_device_eval_batch_size=o.eval_batch_size or o.batch_size,
        gradient_accumulation_steps=o.grad_accum,
        learning_rate=o.lr,
        num_train_epochs=o.epochs,
        max_steps=o.max_steps,
        warmup_steps=o.warmup_steps,
        lr_scheduler_type=scheduler,
        weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm if o.max_grad_norm > 0 else None,
        bf16=o.precision == "bf16",
        fp16=o.precision == "fp16",
        deepspeed=o.deepspeed,
        logging_strategy="steps",
        logging_steps=log.logging_steps,
        eval_strategy=eval_strategy,
        save_strategy=save_strategy,
        save_total_limit=log.save_total_limit,
        save_safetensors=True,
        load_best_model_at_end=False,
        report_to=[],
        disable_tqdm=quiet or not log.progress_bar,
        dataloader_num_workers=o.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        label_names=["risk_level", "risk_type"],
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        **kwargs,
    )


def prepare_feature_cache(model, processor, records, image_root, config: TrainConfig, device, state, quiet=False):
    """Fill the feature cache for ``records`` (each rank a share) and return (cache, keys, computed)."""
    from safevlm.train.cache import FeatureCache, ImageHasher, image_encoder, record_image_keys

    no_image = [r.id for r in records if r.image is None]
    if no_image:
        raise ValueError(
            f"{len(no_image)} records have no image (e.g. {no_image[:3]}); the feature cache needs one image per "
            "record: set cache.enabled=false"
        )
    root = config.cache_dir
    hasher = ImageHasher(root)
    keys = record_image_keys(records, image_root, hasher)
    if state.is_main_process:
        hasher.save()
    cache = FeatureCache.for_model(root, model, processor.image_processor)
    state.wait_for_everyone()  # every rank has its snapshot of the cache before any rank writes
    model.backbone.vision_tower.to(device)
    encode = image_encoder(model, processor, image_root)
    items = [(keys[r.id], r) for r in records]
    computed = cache.fill(
        encode, items, batch_size=config.cache.batch_size, shard_size=config.cache.shard_size,
        rank=state.process_index, world_size=state.num_processes,
        progress=config.log.progress_bar and not quiet and state.is_main_process,
    )
    state.wait_for_everyone()
    cache.refresh()
    still = cache.missing(keys.values())
    if still:
        raise RuntimeError(f"{len(still)} images are still missing from the feature cache {cache.dir}")
    return cache, keys, computed


def final_eval_metrics(trainer) -> dict:
    """Validation metrics at the last step: reused from the log when the Trainer has just
    evaluated there (end of the last epoch), else evaluated now."""
    step = trainer.state.global_step
    for entry in reversed(trainer.state.log_history):
        if entry.get("step") == step and "eval_type_macro_f1" in entry:
            return {k: v for k, v in entry.items() if k.startswith("eval_") or k == "epoch"}
    return trainer.evaluate()


def run_stage(
    train_config: TrainConfig,
    model: nn.Module | None = None,
    processor=None,
    train_records: list | None = None,
    val_records: list | None = None,
    resume: bool | str = False,
    callbacks: list | None = None,
    quiet: bool = False,
) -> StageResult:
    """Run one training stage and write its adapter to ``<output_dir>/adapter``.

    Args:
        train_config: the recipe.
        model: a :class:`~safevlm.model.SafeVLM` to train (stage 2: the stage-1 model; LoRA is
            added to its base in place). None: built from ``model.base`` / ``model.adapter``.
        processor: the base's processor (None: loaded with the base).
        train_records, val_records: :class:`~safevlm.data.SafetyRecord` lists (None: loaded from
            ``data``); relative image paths resolve against ``data.image_root``.
        resume: True continues from the newest complete checkpoint in ``output_dir`` (a fresh
            start if there is none); a path continues from that checkpoint.
        callbacks: extra ``transformers.TrainerCallback`` objects.
        quiet: print nothing while training: no progress bars (whatever ``log.progress_bar``
            says) and no log lines; ``metrics.jsonl`` is written all the same.

    Returns:
        a :class:`StageResult`.
    """
    from accelerate import PartialState

    from safevlm.data import SafetyCollator
    from safevlm.train import checkpoint as ckpt
    from safevlm.train.cache import CachedFeatureCollator
    from safevlm.train.trainable import trainable_counts
    from safevlm.train.trainer import (
        METRICS_NAME,
        PLOT_NAME,
        MetricsLogger,
        RecordDataset,
        SafetyTrainer,
        compute_head_metrics,
        plot_metrics,
    )

    config = train_config
    out = Path(config.output_dir)
    earlier = ckpt.list_checkpoints(out)
    if earlier and not resume and not config.overwrite:
        raise ValueError(
            f"{out} holds checkpoints of an earlier run ({earlier[0][1].name}, ...): pass --resume to continue it, "
            "set overwrite: true to start afresh (deletes them), or choose another output_dir"
        )
    resumed_from = None
    if resume:
        resumed_from = Path(resume) if isinstance(resume, (str, Path)) else ckpt.find_resume_checkpoint(out)
        if resumed_from is None:
            logger.warning("--resume: no complete checkpoint in %s; starting from the beginning", out)
        else:
            problem = ckpt.checkpoint_problem(resumed_from) or ckpt.legacy_state_problem(resumed_from)
            if problem:
                raise ValueError(f"cannot resume from {resumed_from}: {problem}")
            ckpt.check_weights_only(resumed_from)  # before anything is loaded from it

    # -- model --------------------------------------------------------------------------------
    if model is None:
        base, loaded_processor = load_base(config)
        processor = processor if processor is not None else loaded_processor
        model = build_model(config, base)
    elif processor is None:
        raise ValueError("run_stage got a model but no processor")
    prepare_model(model, config)

    # -- data ---------------------------------------------------------------------------------
    has_val_input = val_records is not None
    args = training_arguments(config, has_val=True, quiet=quiet)  # initialises the distributed state
    state = PartialState()
    if train_records is None:
        train_records, loaded_val, image_root = load_stage_data(
            config, model.config.taxonomy, state.is_main_process, state.wait_for_everyone
        )
        val_records = val_records if has_val_input else loaded_val
    else:
        image_root = config.data.image_root
    val_records = list(val_records or [])
    if config.data.decision_swap_ratio > 0:
        from safevlm.train.swaps import decision_swaps

        if model.config.prefix_conditioning != "decision" or not model.prefix_tokens.conditioned:
            raise ConfigError(
                "data.decision_swap_ratio needs prefix tokens conditioned on the head's decision: build the model "
                f"with safety prefix_conditioning: decision (this one has {model.config.prefix_conditioning!r}, "
                f"{model.config.num_prefix_tokens} prefix tokens)"
            )
        swaps = decision_swaps(train_records, config.data.decision_swap_ratio, config.seed)
        logger.info("decision swaps: %d added to %d training records", len(swaps), len(train_records))
        train_records = list(train_records) + swaps
    if config.data.hint_ratio > 0:
        from safevlm.data.collator import POLICY_HINT_KEY
        from safevlm.policy import load_policy
        from safevlm.train.hints import policy_hints

        try:
            hint_policy = load_policy(config.data.hint_policy, model.config.taxonomy)
        except (OSError, ValueError) as err:
            raise ConfigError(f"data.hint_policy: {err}") from None
        train_records = policy_hints(train_records, config.data.hint_ratio, hint_policy, config.seed)
        logger.info("policy hints (%s): %d of %d training records", hint_policy.name,
                    sum(POLICY_HINT_KEY in r.metadata for r in train_records), len(train_records))
    if not val_records and args.eval_strategy != "no":
        args = training_arguments(config, has_val=False, quiet=quiet)
    collator = SafetyCollator(
        processor, max_length=config.data.max_length, num_prefix_tokens=model.config.num_prefix_tokens,
        image_root=image_root,
    )

    # -- vision-feature cache -----------------------------------------------------------------
    cache_info = None
    if config.cache.enabled:
        cache, keys, computed = prepare_feature_cache(
            model, processor, list(train_records) + val_records, image_root, config, args.device, state, quiet
        )
        # Without the LLM (stage 1, w_lm = 0) one masked placeholder per image is enough; with it,
        # every image takes its tokens (variable-length families: each its own, stored in the cache).
        placeholders = model.backbone.fixed_image_tokens if config.loss.lm_weight > 0 else 1
        collator = CachedFeatureCollator(collator, cache, keys, placeholders)
        cache_info = {"dir": str(cache.dir), "namespace": cache.namespace, "computed": computed, "entries": len(cache)}

    # -- trainer --------------------------------------------------------------------------------
    state.wait_for_everyone()
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_staging(out)
        if earlier and not resume:
            for _, path in earlier:
                ckpt.delete_dir(path)
        (out / CONFIG_COPY_NAME).write_text(
            f"# safevlm train --config {CONFIG_COPY_NAME}  (the resolved recipe of this run)\n" + config.to_yaml()
        )
    state.wait_for_everyone()
    safe_type = model.config.taxonomy.safe_type_id
    sampler_options = None
    if config.data.balance_types or config.data.clean_ratio is not None or config.data.samples_per_epoch:
        sampler_options = {
            "safe_type_id": safe_type,
            "clean_ratio": config.data.clean_ratio,
            "balance_types": config.data.balance_types,
            "num_samples": config.data.samples_per_epoch,
        }
    if config.data.group_by_length:
        sampler_options = sampler_options or {
            "safe_type_id": safe_type, "clean_ratio": None, "balance_types": False, "num_samples": None,
        }
        sampler_options["lengths"] = [collator.token_length(r) for r in train_records]
        sampler_options["batch_size"] = args.per_device_train_batch_size
        sampler_options["length_window"] = config.data.length_window
    trainer = SafetyTrainer(
        model=model,
        args=args,
        train_dataset=RecordDataset(train_records),
        eval_dataset=RecordDataset(val_records) if val_records else None,
        data_collator=collator,
        compute_metrics=compute_head_metrics if val_records else None,
        callbacks=[MetricsLogger(out, plot=False), *(callbacks or [])],
        cls_weight=config.loss.cls_weight,
        lm_weight=config.loss.lm_weight,
        full_logits=config.loss.lm_logits == "full",
        sampler_options=sampler_options,
    )
    if quiet:
        from transformers import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)  # prints every log dict when there is no bar
        trainer.remove_callback(ProgressCallback)
    logger.info("stage %d: trainable parameters %s", config.stage, trainable_counts(model))

    train_output = trainer.train(resume_from_checkpoint=str(resumed_from) if resumed_from else None)

    metrics = final_eval_metrics(trainer) if val_records else {}
    adapter_dir = trainer.save_adapter(config.adapter_dir)
    if config.log.plot and state.is_main_process:
        plot_metrics(out / METRICS_NAME, out / PLOT_NAME)
    model.eval()
    return StageResult(
        stage=config.stage,
        output_dir=out,
        adapter_dir=adapter_dir,
        metrics=dict(metrics),
        train_metrics=dict(train_output.metrics),
        global_step=trainer.state.global_step,
        resumed_from=resumed_from,
        cache=cache_info,
        model=model,
    )


__all__ = [
    "StageResult",
    "add_lora",
    "build_model",
    "load_base",
    "load_stage_data",
    "lora_target_regex",
    "parse_tiny_spec",
    "prepare_model",
    "run_stage",
    "training_arguments",
]
