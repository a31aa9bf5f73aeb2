"""Shared by the model-side evaluation tests (tests/test_eval_*.py): a saved tiny base, a safety
adapter with fresh (seeded) modules, the demo's synthetic data, and helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SAFETY_SIZES = {"num_prefix_tokens": 4, "num_query_tokens": 4, "head_num_heads": 4}
SHARED_SAFEBENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "safebench.csv"


@pytest.fixture(scope="session")
def eval_env(tmp_path_factory):
    """``{"root", "base", "adapter", "data"}``: tiny 'test' base saved as a Hugging Face folder,
    an adapter of fresh safety modules (seed 0) bound to it, and 300 synthetic samples (32 px;
    val and test splits of 30 each)."""
    import torch

    from safevlm.data.synth import make_synthetic_dataset
    from safevlm.loading import load_model_and_processor
    from safevlm.tiny import save_tiny

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("eval_env")
    save_tiny(root / "base", preset="test", seed=0)
    make_synthetic_dataset(root / "data", 300, seed=0, image_size=32)
    model, _ = load_model_and_processor(str(root / "base"), None, device="cpu", dtype="float32", seed=0, **SAFETY_SIZES)
    model.save_pretrained(root / "adapter")
    return {"root": root, "base": str(root / "base"), "adapter": str(root / "adapter"), "data": str(root / "data")}


def load_env_model(env, adapter: str | None = None):
    """(SafeVLM, processor) of the env's base and adapter, on CPU in float32."""
    from safevlm.loading import load_model_and_processor

    return load_model_and_processor(env["base"], adapter or env["adapter"], device="cpu", dtype="float32")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``safevlm`` in-process: (exit code, stdout, stderr)."""
    from safevlm.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


__all__ = ["SAFETY_SIZES", "SHARED_SAFEBENCH", "eval_env", "last_json", "load_env_model", "run_cli"]
