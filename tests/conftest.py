"""Shared fixtures: one tiny LLaVA (hidden 32, 2 layers, 16-px images) built from configs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny():
    """(base model, processor) of the 'test' preset; do not mutate the base in tests."""
    from safevlm.tiny import build_tiny

    torch.set_num_threads(2)
    return build_tiny("test", seed=0)


@pytest.fixture(scope="session")
def tiny_processor(tiny):
    return tiny[1]


def make_image(seed: int = 0, size: int = 24):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


def make_inputs(processor, prompts, seed: int = 0):
    """Processor inputs for one image per prompt, chat-formatted, left-padded."""
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True
        )
        for p in prompts
    ]
    images = [make_image(seed + i) for i in range(len(prompts))]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


@pytest.fixture
def safe_model(tiny):
    from safevlm.model import SafeVLM

    torch.manual_seed(0)
    return SafeVLM(tiny[0], num_prefix_tokens=4, num_query_tokens=4, head_num_heads=4).eval()
