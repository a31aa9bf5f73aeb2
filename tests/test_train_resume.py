"""Kill-safe checkpoints: sealed by a manifest, newest complete checkpoint wins, SIGKILL + --resume,
state files that hold other objects than plain data are refused.

The end-to-end tests run stage 1 of the tiny 'test' model in subprocesses: one uninterrupted,
one SIGKILLed right after its first checkpoint (a callback kills the process from inside
``on_save``), one SIGKILLed in the middle of writing its second checkpoint (``torch.save`` of
the RNG state kills it). Both are resumed with ``safevlm train --resume``. On CPU every step is
deterministic (data order from the sampler's seed and epoch, dropout from the restored RNG
state, exact optimizer state), so the final adapters must be *bitwise* equal to the
uninterrupted run's: tolerance 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_fixtures import synth_data, tiny_config, tiny_recipe  # noqa: F401 (fixture)

from safevlm.train import checkpoint as ckpt

TESTS = Path(__file__).resolve().parent

DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from transformers import TrainerCallback
    from safevlm.train import TrainConfig, run_stage

    config_path, mode = sys.argv[1], sys.argv[2]

    class KillAfterSave(TrainerCallback):   # SIGKILL right after the first checkpoint is sealed
        def on_save(self, args, state, control, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

    if mode == "kill-in-save":              # SIGKILL half-way through writing the 2nd checkpoint:
        original = torch.save               # adapter and optimizer written, RNG state not yet
        def dying(obj, f, *args, **kwargs):
            if "checkpoint-6" in str(f) and "rng_state" in str(f):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(obj, f, *args, **kwargs)
        torch.save = dying

    callbacks = [KillAfterSave()] if mode == "kill-after-save" else None
    run_stage(TrainConfig.from_yaml(config_path), callbacks=callbacks)
    """
)


def _write_config(tmp_path: Path, name: str, data_dir: Path) -> Path:
    recipe = tiny_recipe(
        tmp_path / name,
        data={"train": str(data_dir / "train.jsonl"), "val": str(data_dir / "val.jsonl")},
        optim={"epochs": 2, "batch_size": 8},
        log={"save_steps": 3, "eval_steps": 3, "save_total_limit": 3, "plot": False},
        cache={"dir": str(tmp_path / "cache")},
    )
    recipe["output_dir"] = str(tmp_path / name / "run")
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"# safevlm train --config {path}\n" + yaml.safe_dump(recipe))
    return path


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return env


def _driver(tmp_path: Path, config: Path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    return subprocess.run([sys.executable, str(script), str(config), mode], env=_env(), capture_output=True,
                          text=True, timeout=600)


def _cli_resume(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "safevlm.cli", "train", "--config", str(config), "--resume",
                           "log.progress_bar=false"], env=_env(), capture_output=True, text=True, timeout=600)


def _adapter(config: Path) -> dict[str, torch.Tensor]:
    out = Path(yaml.safe_load(config.read_text().split("\n", 1)[1])["output_dir"])
    return load_file(str(out / "adapter" / "safety_model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synth_data):  # noqa: F811
    tmp = tmp_path_factory.mktemp("resume")
    config = _write_config(tmp, "full", synth_data)
    done = _driver(tmp, config, "full")
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, config


@pytest.mark.slow
def test_sigkill_after_first_checkpoint_then_resume_equals_uninterrupted(reference, synth_data):  # noqa: F811
    tmp, full_config = reference
    config = _write_config(tmp, "killed", synth_data)
    run_dir = tmp / "killed" / "run"
    killed = _driver(tmp, config, "kill-after-save")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [p.name for _, p in ckpt.list_checkpoints(run_dir)] == ["checkpoint-3"]
    assert not (run_dir / "adapter").exists()

    resumed = _cli_resume(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout[resumed.stdout.index("{\n"):])
    assert summary["resumed_from"].endswith("checkpoint-3") and summary["global_step"] == 12
    a, b = _adapter(full_config), _adapter(config)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # tolerance 0: bitwise equal
    # metrics.jsonl tells one run: no step logged twice across the kill
    steps = [e["step"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in e]
    assert steps == sorted(set(steps)) and steps[-1] == 12


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_no_checkpoint_that_loads_wrong(reference, synth_data):  # noqa: F811
    tmp, full_config = reference
    config = _write_config(tmp, "in_save", synth_data)
    run_dir = tmp / "in_save" / "run"
    killed = _driver(tmp, config, "kill-in-save")
    assert killed.returncode == -9, killed.stderr[-3000:]
    # the half-written checkpoint-6 has no manifest, so it is not a checkpoint
    half = run_dir / "checkpoint-6"
    assert [p.name for _, p in ckpt.list_checkpoints(run_dir)] == ["checkpoint-6", "checkpoint-3"]
    assert (half / "optimizer.pt").is_file() and not (half / "rng_state.pth").exists()
    assert "no checkpoint.json" in ckpt.checkpoint_problem(half)
    assert ckpt.find_resume_checkpoint(run_dir) == run_dir / "checkpoint-3"

    resumed = _cli_resume(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout[resumed.stdout.index("{\n"):])
    assert summary["resumed_from"].endswith("checkpoint-3")
    assert ckpt.checkpoint_problem(half) is None  # written afresh and sealed by the resumed run
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]
    a, b = _adapter(full_config), _adapter(config)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoints_hold_adapters_and_weights_only_state(reference):
    tmp, _ = reference
    run_dir = tmp / "full" / "run"
    checkpoints = ckpt.list_checkpoints(run_dir)
    assert [s for s, _ in checkpoints] == [12, 9, 6]  # save_total_limit 3
    for _, path in checkpoints:
        assert ckpt.checkpoint_problem(path) is None
        names = {p.name for p in path.rglob("*") if p.is_file()}
        # the adapter in safetensors + JSON; the Trainer's own resume state; no training_args.bin
        assert names == {"checkpoint.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                         "safety_config.json", "safety_model.safetensors", "trainer_state.json"}
        ckpt.check_weights_only(path)  # every torch file unpickles weights-only (the RNG state's NumPy arrays too)
        state = torch.load(path / "optimizer.pt", weights_only=True)
        assert len(state["state"]) == sum(len(g["params"]) for g in state["param_groups"]) > 0
        assert torch.load(path / "scheduler.pt", weights_only=True)["last_epoch"] == int(path.name.split("-")[1])
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]


class _RunsCode:
    """Unpickling this runs ``touch <marker>``: what a tampered checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_state_file_holding_another_object(reference, tmp_path, capsys):
    import shutil

    from safevlm.cli import main

    _, full_config = reference
    config = tmp_path / "tampered.yaml"
    recipe = yaml.safe_load(full_config.read_text().split("\n", 1)[1])
    recipe["output_dir"] = str(tmp_path / "run")
    config.write_text("# safevlm train --config tampered.yaml\n" + yaml.safe_dump(recipe))
    source = Path(yaml.safe_load(full_config.read_text().split("\n", 1)[1])["output_dir"]) / "checkpoint-6"
    target = tmp_path / "run" / "checkpoint-6"
    shutil.copytree(source, target)
    marker = tmp_path / "code-ran"
    rng = torch.load(target / "rng_state.pth", weights_only=False)
    torch.save({**rng, "extra": _RunsCode(marker)}, target / "rng_state.pth")
    ckpt.seal_checkpoint(target, 6)  # sizes check out: only the content is wrong
    assert ckpt.find_resume_checkpoint(tmp_path / "run") == target

    assert main(["train", "--config", str(config), "--resume", "log.progress_bar=false"]) == 2
    err = capsys.readouterr().err
    assert f"{target / 'rng_state.pth'}: holds a pickled object that is not plain tensors" in err
    assert "refusing to resume" in err and "Traceback" not in err
    assert not marker.exists()
    with pytest.raises(ValueError, match="rng_state.pth: holds a pickled object"):
        ckpt.check_weights_only(target)


def _fake_checkpoint(root: Path, step: int) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "safety_model.safetensors").write_bytes(b"x" * (100 + step))
    (folder / "trainer_state.json").write_text("{}")
    ckpt.seal_checkpoint(folder, step)
    return folder


def test_newest_complete_checkpoint_is_chosen(tmp_path):
    for step in (3, 6, 9):
        _fake_checkpoint(tmp_path, step)
    assert ckpt.find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint-9"
    # a file cut short (e.g. a disk that filled up, or a hand edit) disqualifies the checkpoint
    (tmp_path / "checkpoint-9" / "safety_model.safetensors").write_bytes(b"x")
    assert "safety_model.safetensors has 1 bytes, the manifest says 109" in ckpt.checkpoint_problem(tmp_path / "checkpoint-9")
    # a folder without a manifest (not committed) is skipped too
    (tmp_path / "checkpoint-6" / ckpt.MANIFEST_NAME).unlink()
    assert ckpt.find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    (tmp_path / ".staging-checkpoint-12").mkdir()
    removed = ckpt.remove_stale_staging(tmp_path)
    assert [p.name for p in removed] == [".staging-checkpoint-12"]
    assert ckpt.find_resume_checkpoint(tmp_path / "nothing") is None


def test_a_checkpoint_of_the_earlier_state_format_is_refused_not_half_restored(tmp_path):
    from safevlm.train import run_stage

    config = tiny_config(tmp_path)
    folder = Path(config.output_dir) / "checkpoint-3"
    folder.mkdir(parents=True)
    (folder / "optimizer.safetensors").write_bytes(b"x" * 10)  # optimizer / RNG state as safevlm wrote them before
    (folder / "safety_model.safetensors").write_bytes(b"x" * 10)
    ckpt.seal_checkpoint(folder, 3)
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint-3: its training state \(optimizer.safetensors\)"
                                         r" was written by an earlier safevlm"):
        run_stage(config, resume=True)


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (3, 6, 9, 12):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-9" / ckpt.MANIFEST_NAME).unlink()  # 9 was never sealed
    deleted = ckpt.rotate_checkpoints(tmp_path, keep=2)
    # 12 and 6 are the two newest complete ones; 9 (newer than 6) stays, 3 goes
    assert [p.name for p in deleted] == ["checkpoint-3"]
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-12", "checkpoint-9", "checkpoint-6"]
    assert ckpt.rotate_checkpoints(tmp_path, keep=None) == []
    assert [p.name for p in ckpt.rotate_checkpoints(tmp_path, keep=1)] == ["checkpoint-9", "checkpoint-6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-12"]  # no trash left


def test_replace_dir_swaps_a_folder_in_one_rename(tmp_path):
    final = _fake_checkpoint(tmp_path, 3)
    staging = tmp_path / ".staging-checkpoint-3"
    staging.mkdir()
    (staging / "new.json").write_text("{}")
    ckpt.replace_dir(staging, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
