"""Kill-safe checkpoints: atomic commit, newest complete checkpoint wins, SIGKILL + --resume.

The end-to-end tests run stage 1 of the tiny 'test' model in subprocesses: one uninterrupted,
one SIGKILLed right after its first checkpoint (a callback kills the process from inside
``on_save``), one SIGKILLed in the middle of writing its second checkpoint. Both are resumed
with ``safevlm train --resume``. On CPU every step is deterministic (data order from the
sampler's seed and epoch, dropout from the restored RNG state, exact optimizer state), so
the final adapters must be *bitwise* equal to the uninterrupted run's: tolerance 0.
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
from train_fixtures import synth_data, tiny_recipe  # noqa: F401 (fixture)

from safevlm.train import checkpoint as ckpt

TESTS = Path(__file__).resolve().parent

DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from transformers import TrainerCallback
    from safevlm.train import TrainConfig, run_stage
    from safevlm.train.trainer import SafetyTrainer

    config_path, mode = sys.argv[1], sys.argv[2]

    class KillAfterSave(TrainerCallback):   # SIGKILL right after the first checkpoint is committed
        def on_save(self, args, state, control, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

    if mode == "kill-in-save":              # SIGKILL half-way through writing the 2nd checkpoint
        original = SafetyTrainer._save_rng_state
        def dying(self, output_dir):
            if self.state.global_step >= 6:
                os.kill(os.getpid(), signal.SIGKILL)
            original(self, output_dir)
        SafetyTrainer._save_rng_state = dying

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
    # the half-written checkpoint-6 exists only under its staging name
    assert [p.name for _, p in ckpt.list_checkpoints(run_dir)] == ["checkpoint-3"]
    staging = run_dir / ".staging-checkpoint-6"
    assert staging.is_dir() and not (staging / ckpt.MANIFEST_NAME).exists()
    assert ckpt.find_resume_checkpoint(run_dir) == run_dir / "checkpoint-3"

    resumed = _cli_resume(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not staging.exists()
    a, b = _adapter(full_config), _adapter(config)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoints_hold_no_pickle(reference):
    tmp, _ = reference
    run_dir = tmp / "full" / "run"
    checkpoints = ckpt.list_checkpoints(run_dir)
    assert [s for s, _ in checkpoints] == [12, 9, 6]  # save_total_limit 3
    for _, path in checkpoints:
        assert ckpt.checkpoint_problem(path) is None
        names = {p.name for p in path.rglob("*") if p.is_file()}
        assert names == {"checkpoint.json", "optimizer.safetensors", "scheduler.json", "rng_state.safetensors",
                         "safety_config.json", "safety_model.safetensors", "trainer_state.json"}
        for p in path.rglob("*"):
            if p.is_file():
                assert not p.read_bytes().startswith(b"\x80"), f"{p} looks like a pickle"
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]


def _fake_checkpoint(root: Path, step: int) -> Path:
    staging = root / f".staging-checkpoint-{step}"
    staging.mkdir(parents=True)
    (staging / "safety_model.safetensors").write_bytes(b"x" * (100 + step))
    (staging / "trainer_state.json").write_text("{}")
    return ckpt.commit_checkpoint(staging, root / f"checkpoint-{step}", step)


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


def test_commit_replaces_an_existing_folder_atomically(tmp_path):
    _fake_checkpoint(tmp_path, 3)
    staging = tmp_path / ".staging-checkpoint-3"
    staging.mkdir()
    (staging / "new.json").write_text("{}")
    ckpt.commit_checkpoint(staging, tmp_path / "checkpoint-3", 3)
    assert sorted(p.name for p in (tmp_path / "checkpoint-3").iterdir()) == ["checkpoint.json", "new.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]


def test_optimizer_and_rng_state_round_trip_without_pickle(tmp_path):
    import random

    import numpy as np

    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.8, 0.9))
    for _ in range(2):
        sum((p ** 2).sum() for p in params).backward()
        opt.step()
    ckpt.save_optimizer_state(opt, tmp_path / "opt.safetensors")
    fresh = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=5.0)
    ckpt.load_optimizer_state(fresh, tmp_path / "opt.safetensors")
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"] == 1e-3
    assert tuple(b["param_groups"][0]["betas"]) == (0.8, 0.9)
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k])

    ckpt.save_rng_state(tmp_path / "rng.safetensors")
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    ckpt.load_rng_state(tmp_path / "rng.safetensors")
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
