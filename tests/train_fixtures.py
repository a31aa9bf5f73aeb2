"""Shared helpers for the training tests (tests/test_train_*.py): tiny recipes and records."""

from __future__ import annotations

import io

import numpy as np
import pytest

# Words of the tiny tokenizer's corpus, one per risk type (index = type id; 6 = safe).
TYPE_WORDS = ("politics", "illegal", "insult", "fairness", "privacy", "misleading", "safe")
SAFETY_TEST_SIZES = {"num_prefix_tokens": 4, "num_query_tokens": 4, "head_num_heads": 4}


# One colour per risk type, so that the image alone also tells the type.
TYPE_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (128, 128, 128))


def png_bytes(seed: int, size: int = 24, colour: tuple[int, int, int] | None = None) -> bytes:
    """A unique PNG: random noise, or a solid ``colour`` with a little noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    noise = rng.random((size, size, 3))
    pixels = noise * 255 if colour is None else np.clip(np.array(colour) + (noise - 0.5) * 40, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def keyword_records(n: int, seed: int = 0, prefix: str = "r"):
    """Records whose prompt names the risk type and whose image has the type's colour (each
    image unique, in memory), with a short answer; level 0 for safe, 1-3 otherwise."""
    from safevlm.data import SafetyRecord, Turn

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = int(rng.integers(0, len(TYPE_WORDS)))
        level = 0 if t == 6 else 1 + int(rng.integers(0, 3))
        prompt = f"{TYPE_WORDS[t]} request: what is shown in the image?"
        answer = "The image shows a red circle." if t == 6 else "I am sorry, but I can't help with that request."
        image = png_bytes(seed * 100_003 + i, colour=TYPE_COLOURS[t])
        turns = [Turn("user", prompt), Turn("assistant", answer)]
        out.append(SafetyRecord(id=f"{prefix}{i}", image=image, turns=turns, risk_level=level, risk_type=t, source="test"))
    return out


def tiny_recipe(tmp_path, stage: int = 1, **sections) -> dict:
    """A recipe dict for the 'test' preset; ``sections`` update the defaults one level deep."""
    recipe = {
        "stage": stage,
        "output_dir": str(tmp_path / f"stage{stage}"),
        "seed": 0,
        "model": {"base": "tiny:test", "safety": dict(SAFETY_TEST_SIZES)},
        "loss": {"cls_weight": 1.0, "lm_weight": 0.0 if stage == 1 else 1.0},
        "cache": {"dir": str(tmp_path / "cache")},
        "optim": {"lr": 3e-3, "epochs": 2, "batch_size": 8, "warmup_steps": 0},
        "log": {"logging_steps": 2, "progress_bar": False, "plot": True},
    }
    if stage == 2:
        recipe["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def tiny_config(tmp_path, stage: int = 1, **sections):
    from safevlm.train import TrainConfig

    return TrainConfig.from_dict(tiny_recipe(tmp_path, stage, **sections))


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A small synthetic PSA-VLM dataset on disk (32-px images)."""
    from safevlm.data.synth import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(root, n=60, seed=0, image_size=32)
    return root


@pytest.fixture
def one_thread():
    """Train with one torch thread: on a busy 2-core machine two OpenMP threads can wait on
    each other for a long time; one thread keeps these tests' run time steady."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
