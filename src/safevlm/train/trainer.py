"""A thin Hugging Face ``Trainer`` for :class:`~safevlm.model.SafeVLM`.

The Trainer runs the loop, and with it DDP / FSDP / DeepSpeed from ``accelerate launch``.
This subclass only changes what is specific to safety adapters:

* **saving**: the model is an ``nn.Module`` holding a frozen base, so a "model save" writes
  the safety adapter (``safety_config.json`` + ``safety_model.safetensors``, and ``lora/`` in
  peft's format after stage 2) — never the base weights, never a pickle;
* **checkpoints** are staged, fsynced and renamed into place (``safevlm.train.checkpoint``),
  with optimizer / scheduler / RNG states in safetensors + JSON; resuming loads them back;
* **sampling**: :class:`~safevlm.train.sampler.BalancedRiskSampler` (risk types, clean:risky);
* **evaluation** returns the head logits and risk labels, so ``compute_metrics`` reports
  per-head accuracy and macro-F1; training logs also carry the loss components.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from safevlm.model import LORA_DIR, WEIGHTS_NAME
from safevlm.train import checkpoint as ckpt
from safevlm.train.metrics import head_metrics
from safevlm.train.sampler import BalancedRiskSampler

TRAINER_STATE_NAME = "trainer_state.json"
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
    """Write ``model``'s safety adapter (and LoRA) to ``directory``.

    ``state_dict`` (from ``accelerator.get_state_dict`` under FSDP / ZeRO-3, where the module's
    own parameters are shards) supplies the full tensors; keys are relative to the SafeVLM.
    """
    directory = Path(directory)
    if state_dict is None:
        return model.save_pretrained(directory)
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    safety = {
        k: v.detach().to("cpu").contiguous()
        for k, v in state_dict.items()
        if k.split(".", 1)[0] in model.SAFETY_MODULES
    }
    expected = set(model.safety_state_dict())
    if set(safety) != expected:
        raise ValueError(f"the gathered state dict lacks safety keys {sorted(expected - set(safety))[:5]}")
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(safety, str(tmp), metadata={"format": "pt", "safevlm": "safety_adapter"})
    os.replace(tmp, directory / WEIGHTS_NAME)
    model.config.save(directory)
    if hasattr(model.base_model, "peft_config"):
        prefix = "base_model."
        base_state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        model.base_model.save_pretrained(str(directory / LORA_DIR), state_dict=base_state)
    return directory


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


# --------------------------------------------------------------------------------- trainer
class SafetyTrainer(Trainer):
    """``Trainer`` for SafeVLM safety adapters (see the module docstring).

    Args (besides the Trainer's):
        sampler_options: keyword arguments of :class:`BalancedRiskSampler` except the records'
            risk types (``safe_type_id``, ``clean_ratio``, ``balance_types``, ``num_samples``);
            None means plain shuffling.
    """

    def __init__(self, *args, sampler_options: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # SafeVLM.forward takes **unused and ignores num_items_in_batch, so the Trainer must
        # scale the loss for gradient accumulation itself.
        self.model_accepts_loss_kwargs = False
        self.sampler_options = sampler_options
        self._component_sums: dict[str, torch.Tensor] = {}  # loss components since the last log
        self._component_count = 0

    # -- sampling --------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.sampler_options is None:
            return super()._get_train_sampler(dataset) if train_dataset is not None else super()._get_train_sampler()
        risk_types = [r.risk_type for r in dataset.records]
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return BalancedRiskSampler(risk_types, seed=seed, **self.sampler_options)

    # -- loss ------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if outputs.loss is None:
            raise ValueError("the batch has no risk labels and no LM labels: nothing to train on")
        if model.training:
            for key in ("level_loss", "type_loss", "lm_loss"):
                value = getattr(outputs, key)
                if value is not None:
                    value = value.detach()
                    self._component_sums[key] = self._component_sums.get(key, 0.0) + value
            self._component_count += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._component_count:
            for key, total in self._component_sums.items():
                logs[key] = round(float(total) / self._component_count, 4)
            self._component_sums, self._component_count = {}, 0
        super().log(logs, *args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            outputs = model(**inputs)
        loss = outputs.loss.detach() if outputs.loss is not None else None
        if prediction_loss_only:
            return loss, None, None
        logits = (outputs.level_logits.detach().float(), outputs.type_logits.detach().float())
        labels = (inputs["risk_level"], inputs["risk_type"])
        return loss, logits, labels

    # -- saving ----------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None):
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
        if self.args.should_save:
            if staging.exists():
                shutil.rmtree(staging)
        self.save_model(str(staging), _internal_call=True)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            ckpt.replace_dir(staging, directory)
        self.accelerator.wait_for_everyone()
        return directory

    def _save_checkpoint(self, model, trial):
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        run_dir = Path(self._get_output_dir(trial=trial))
        final = run_dir / name
        staging = run_dir / f"{ckpt.STAGING_PREFIX}{name}"
        if self.args.should_save:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        self.save_model(str(staging), _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(str(staging))
            self._save_scaler(str(staging))
            self._save_rng_state(str(staging))
        if self.args.should_save:
            from transformers.trainer_callback import ExportableState

            for cb in [c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)]:
                cb_name = cb.__class__.__name__
                if isinstance(self.state.stateful_callbacks.get(cb_name), list):
                    self.state.stateful_callbacks[cb_name].append(cb.state())
                else:
                    self.state.stateful_callbacks[cb_name] = cb.state()
            self.state.save_to_json(str(staging / TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every rank's files are in the staging folder
        if self.args.should_save:
            ckpt.commit_checkpoint(staging, final, self.state.global_step)
            self._rotate_checkpoints(use_mtime=False, output_dir=str(run_dir))
        self.accelerator.wait_for_everyone()

    def _rotate_checkpoints(self, use_mtime=False, output_dir=None) -> None:
        limit = self.args.save_total_limit
        if limit is None or limit <= 0:
            return
        for _, path in ckpt.list_checkpoints(output_dir)[limit:]:
            ckpt.delete_dir(path)

    def _plain_state(self) -> bool:
        """True when optimizer state is an ordinary torch optimizer on this process."""
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _save_optimizer_and_scheduler(self, output_dir):
        if not self._plain_state():
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            ckpt.save_optimizer_state(self.optimizer, Path(output_dir) / ckpt.OPTIMIZER_FILE)
            ckpt.save_state_json(self.lr_scheduler, Path(output_dir) / ckpt.SCHEDULER_FILE, "scheduler")

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        if not self._plain_state():
            return super()._load_optimizer_and_scheduler(checkpoint)
        optimizer_file = Path(checkpoint) / ckpt.OPTIMIZER_FILE
        if optimizer_file.is_file():
            ckpt.load_optimizer_state(self.optimizer, optimizer_file, device=self.args.device)
        scheduler_file = Path(checkpoint) / ckpt.SCHEDULER_FILE
        if scheduler_file.is_file():
            ckpt.load_state_json(self.lr_scheduler, scheduler_file)

    def _save_scaler(self, output_dir):
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            ckpt.save_state_json(scaler, Path(output_dir) / ckpt.SCALER_FILE, "scaler")

    def _load_scaler(self, checkpoint):
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is not None and scaler is not None and (Path(checkpoint) / ckpt.SCALER_FILE).is_file():
            ckpt.load_state_json(scaler, Path(checkpoint) / ckpt.SCALER_FILE)

    def _save_rng_state(self, output_dir):
        os.makedirs(output_dir, exist_ok=True)
        name = ckpt.rng_file_name(self.args.process_index, self.args.world_size)
        ckpt.save_rng_state(Path(output_dir) / name)

    def _load_rng_state(self, checkpoint):
        if checkpoint is None:
            return
        path = Path(checkpoint) / ckpt.rng_file_name(self.args.process_index, self.args.world_size)
        if path.is_file():
            ckpt.load_rng_state(path)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_adapter_weights(model, resume_from_checkpoint)

    def _load_best_model(self):  # load_best_model_at_end is not used
        raise NotImplementedError("safevlm keeps the last adapter; load_best_model_at_end is not supported")


__all__ = [
    "MetricsLogger",
    "RecordDataset",
    "SafetyTrainer",
    "compute_head_metrics",
    "load_adapter_weights",
    "plot_metrics",
    "read_metrics",
    "write_adapter",
]
