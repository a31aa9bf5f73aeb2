"""A thin Hugging Face ``Trainer`` for :class:`~safevlm.model.SafeVLM`.

The Trainer runs the loop, and with it DDP / FSDP / DeepSpeed from ``accelerate launch``, and
writes and restores its own resume state (optimizer, scheduler, RNG: its standard files).
This subclass overrides the public hooks ``compute_loss``, ``prediction_step`` and ``log``,
and three private methods whose signatures both supported transformers lines share:
``_save`` (how a model is written, the override point ``save_model`` documents),
``_get_train_sampler`` (the balanced sampler) and ``_load_from_checkpoint`` (a checkpoint
holds an adapter, not ``model.safetensors``). The rest is callbacks:

* **loss**: ``SafeVLM.forward`` returns the loss components; :meth:`SafetyTrainer.compute_loss`
  weights them with the recipe's ``w_cls`` / ``w_lm`` (training settings, never saved in the
  adapter) and skips the LLM when ``w_lm = 0``;
* **saving**: a "model save" writes the safety adapter (``safety_config.json`` +
  ``safety_model.safetensors``, and ``lora/`` in peft's format after stage 2) with
  :meth:`SafeVLM.save_pretrained` — never the base weights, never a pickle;
* **checkpoints** (:class:`CheckpointSealer`): each is sealed with a size manifest once every
  rank has written it, older ones are rotated out only after that, and a resume first refuses
  state files that hold anything but plain data (``safevlm.train.checkpoint``);
* **sampling**: :class:`~safevlm.train.sampler.BalancedRiskSampler` (risk types, clean:risky);
* **evaluation** returns the head logits and risk labels, so ``compute_metrics`` reports
  per-head accuracy and macro-F1; training logs also carry the loss components.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback

from safevlm.model import LORA_DIR
from safevlm.train import checkpoint as ckpt
from safevlm.train.metrics import head_metrics
from safevlm.train.sampler import BalancedRiskSampler

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


class RecordDataset(Dataset):
    """A list of :class:`~safevlm.data.SafetyRecord`; the collator builds the tensors."""

    def __init__(self, records):
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        return self.records[index]


# --------------------------------------------------------------------------------- adapters
def write_adapter(model, directory: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """Write ``model``'s safety adapter (and LoRA) to ``directory`` with :meth:`SafeVLM.save_pretrained`.

    ``state_dict`` (from ``accelerator.get_state_dict`` under FSDP / ZeRO-3, where the module's
    own parameters are shards) supplies the full tensors; keys are relative to the SafeVLM.
    """
    return model.save_pretrained(directory, state_dict=state_dict)


def load_adapter_weights(model, directory: str | os.PathLike) -> None:
    """Load safety weights (and LoRA weights, if saved) from an adapter or checkpoint folder into ``model``."""
    directory = Path(directory)
    model.load_safety_weights(directory)
    lora = directory / LORA_DIR
    if lora.is_dir():
        if not hasattr(model.base_model, "peft_config"):
            raise ValueError(f"{directory} holds a LoRA adapter but the model has no LoRA layers")
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = lora / "adapter_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"no adapter_model.safetensors in {lora}")
        result = set_peft_model_state_dict(model.base_model, load_file(str(weights)))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"{weights}: unexpected LoRA keys {unexpected[:5]}")


# --------------------------------------------------------------------------------- metrics file
class MetricsLogger(TrainerCallback):
    """Append every log (train losses, eval metrics) to ``<output_dir>/metrics.jsonl`` and draw
    ``loss.png`` at the end. On resume, lines past the resumed step are dropped first, so the
    file describes exactly one run."""

    def __init__(self, output_dir: str | os.PathLike, plot: bool = True):
        self.path = Path(output_dir) / METRICS_NAME
        self.plot = plot

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if state.global_step > 0 and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if entry.get("step", 0) <= state.global_step:
                    kept.append(line)
        tmp = self.path.with_name(METRICS_NAME + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        entry = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.plot:
            plot_metrics(self.path, self.path.with_name(PLOT_NAME))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    entries = []
    path = Path(path)
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return entries


def plot_metrics(metrics_path: str | os.PathLike, out_path: str | os.PathLike) -> Path | None:
    """``loss.png``: training loss (and its components) and validation loss per step; per-head
    validation macro-F1 on the right."""
    entries = read_metrics(metrics_path)
    if not entries:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(e["step"], e[key]) for e in entries if key in e]
        return ([p[0] for p in pts], [p[1] for p in pts]) if pts else None

    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("loss", "-"), ("level_loss", ":"), ("type_loss", ":"), ("lm_loss", "--"), ("eval_loss", "o-")):
        s = series(key)
        if s:
            ax_loss.plot(*s, style, label=key, markersize=3)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    ax_loss.legend(fontsize=8)
    for key in ("eval_level_macro_f1", "eval_type_macro_f1", "eval_level_accuracy", "eval_type_accuracy"):
        s = series(key)
        if s:
            ax_f1.plot(*s, "o-", label=key.removeprefix("eval_"), markersize=3)
    ax_f1.set_ylim(0, 1.02)
    ax_f1.set_xlabel("step")
    ax_f1.set_title("validation")
    if ax_f1.lines:
        ax_f1.legend(fontsize=8)
    fig.tight_layout()
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path


def compute_head_metrics(eval_pred) -> dict[str, float]:
    """``compute_metrics`` for the Trainer: predictions are (level_logits, type_logits),
    label_ids are (risk_level, risk_type)."""
    level_logits, type_logits = eval_pred.predictions
    risk_level, risk_type = eval_pred.label_ids
    return head_metrics(risk_level, level_logits.argmax(-1), risk_type, type_logits.argmax(-1))


# --------------------------------------------------------------------------------- checkpoints
class CheckpointSealer(TrainerCallback):
    """Seal each checkpoint the Trainer writes, and rotate old ones only after that.

    * before a save (``on_step_end`` / ``on_epoch_end`` with ``should_save``): a folder left at
      this step by an earlier, interrupted run is deleted, so no stale file or manifest mixes
      with the new one;
    * ``on_save``: when every rank has written its files, the main process fsyncs them and
      writes the manifest (:func:`~safevlm.train.checkpoint.seal_checkpoint`), then keeps the
      newest ``keep`` complete checkpoints. (The Trainer's own rotation is off: it would delete
      an old checkpoint before the new one is sealed.)
    """

    def __init__(self, keep: int | None = None):
        self.keep = keep

    @staticmethod
    def _folder(args, state) -> Path:
        return Path(args.output_dir) / f"{ckpt.CHECKPOINT_PREFIX}-{state.global_step}"

    def _clear_stale(self, args, state, control):
        if not control.should_save:
            return
        from accelerate import PartialState

        folder = self._folder(args, state)
        if args.should_save and folder.exists():
            ckpt.delete_dir(folder)
        PartialState().wait_for_everyone()  # no rank writes into the folder before it is gone

    def on_step_end(self, args, state, control, **kwargs):
        self._clear_stale(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._clear_stale(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # every rank's files (e.g. its RNG state) are written
        if args.should_save:
            ckpt.seal_checkpoint(self._folder(args, state), state.global_step)
            ckpt.rotate_checkpoints(args.output_dir, self.keep)


# --------------------------------------------------------------------------------- trainer
class SafetyTrainer(Trainer):
    """``Trainer`` for SafeVLM safety adapters (see the module docstring).

    Args (besides the Trainer's):
        cls_weight: w_cls, the weight of ``level_loss + type_loss``.
        lm_weight: w_lm, the weight of ``lm_loss``; 0 skips the language model entirely.
        sampler_options: keyword arguments of :class:`BalancedRiskSampler` except the records'
            risk types (``safe_type_id``, ``clean_ratio``, ``balance_types``, ``num_samples``, and
            ``lengths`` + ``batch_size`` to group batches by length); None means plain shuffling.

    ``args.save_total_limit`` is applied by :class:`CheckpointSealer` (after sealing), not by the
    Trainer.
    """

    def __init__(self, *args, cls_weight: float = 1.0, lm_weight: float = 1.0, sampler_options: dict | None = None,
                 full_logits: bool = False, **kwargs):
        if cls_weight < 0 or lm_weight < 0 or cls_weight + lm_weight == 0:
            raise ValueError(
                f"loss weights must be >= 0 and not both 0, got cls_weight={cls_weight}, lm_weight={lm_weight}"
            )
        # The sealer goes before the caller's callbacks: their on_save sees a sealed checkpoint.
        sealer = CheckpointSealer()
        kwargs["callbacks"] = [sealer, *(kwargs.get("callbacks") or [])]
        super().__init__(*args, **kwargs)
        # The sealer rotates instead of the Trainer (on a copy: the caller's arguments stay as given).
        sealer.keep = self.args.save_total_limit
        self.args = copy.copy(self.args)
        self.args.save_total_limit = None
        self.cls_weight = cls_weight
        self.lm_weight = lm_weight
        self.full_logits = full_logits
        self.sampler_options = sampler_options
        self._component_sums: dict[str, torch.Tensor] = {}  # loss components since the last log
        self._component_count = 0

    # -- sampling --------------------------------------------------------------------------------
    def _get_train_sampler(self, *args, **kwargs):
        if self.sampler_options is None:
            return super()._get_train_sampler(*args, **kwargs)
        risk_types = [r.risk_type for r in self.train_dataset.records]
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return BalancedRiskSampler(risk_types, seed=seed, **self.sampler_options)

    # -- loss ------------------------------------------------------------------------------------
    def weighted_loss(self, outputs) -> torch.Tensor:
        """``w_cls * (level_loss + type_loss) + w_lm * lm_loss`` over the components present."""
        parts = []
        cls_parts = [x for x in (outputs.level_loss, outputs.type_loss) if x is not None]
        if cls_parts:
            parts.append(self.cls_weight * sum(cls_parts))
        if outputs.lm_loss is not None:
            parts.append(self.lm_weight * outputs.lm_loss)
        if not parts:
            raise ValueError("the batch has no risk labels and no LM labels: nothing to train on")
        return sum(parts)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # the loss needs no logits: the LM head runs at the supervised tokens only (unless asked otherwise)
        outputs = model(**inputs, compute_lm=self.lm_weight > 0, return_logits=self.full_logits)
        loss = self.weighted_loss(outputs)
        if model.training:
            for key in ("level_loss", "type_loss", "lm_loss"):
                value = getattr(outputs, key)
                if value is not None:
                    self._component_sums[key] = self._component_sums.get(key, 0.0) + value.detach()
            self._component_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._component_count:
            for key, total in self._component_sums.items():
                logs[key] = round(float(total) / self._component_count, 4)
            self._component_sums, self._component_count = {}, 0
        super().log(logs, *args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = {k: v.to(self.args.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach()
        if prediction_loss_only:
            return loss, None, None
        logits = (outputs.level_logits.detach().float(), outputs.type_logits.detach().float())
        labels = (inputs["risk_level"], inputs["risk_type"])
        return loss, logits, labels

    # -- saving ----------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None):
        # The Trainer's model-saving hook: called by save_model (on every rank in some versions).
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if state_dict is not None:
            # Only FSDP and ZeRO-3 shard the parameters; elsewhere the module's own are complete.
            zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
            if not (self.is_fsdp_enabled or zero3):
                state_dict = None
        write_adapter(model, output_dir, state_dict)

    def save_adapter(self, directory: str | os.PathLike) -> Path:
        """Write the final adapter atomically (staged, then renamed over ``directory``)."""
        directory = Path(directory)
        staging = directory.with_name(f"{ckpt.STAGING_PREFIX}{directory.name}")
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)
        self.save_model(str(staging))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            ckpt.replace_dir(staging, directory)
        self.accelerator.wait_for_everyone()
        return directory

    # -- resuming --------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # The Trainer looks for model.safetensors here; a checkpoint holds the adapter instead.
        # Its optimizer / scheduler / RNG files are loaded by the Trainer, weights-only, and
        # checked here first so that none can hold another object.
        ckpt.check_weights_only(resume_from_checkpoint)
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_adapter_weights(model, resume_from_checkpoint)


__all__ = [
    "CheckpointSealer",
    "MetricsLogger",
    "RecordDataset",
    "SafetyTrainer",
    "compute_head_metrics",
    "load_adapter_weights",
    "plot_metrics",
    "read_metrics",
    "write_adapter",
]
