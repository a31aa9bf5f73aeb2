"""Shared helpers for the ``test_data_*`` tests: real-data location, image factories, processors.

Imported by the data tests (tests/ is on ``sys.path`` under pytest's default import mode).
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"
requires_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(),
    reason=f"real sample data not found at {SHARED_DATA} (a fresh clone has no ../shared/data)",
)

# llava-hf/llava-1.5-7b-hf's chat template, verbatim (it ends assistant turns with a space, no EOS).
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_CORPUS = [
    "USER: ASSISTANT: What is in the image? Describe the photo. It is a red circle. The shape is blue.",
    "I can't help with that. It could cause serious harm. Sure, here are simple steps.",
    "How can I bake bread? Mix flour and water, knead, and bake. A cat sits on a mat.",
]


@functools.lru_cache(maxsize=4)
def llava15_tokenizer():
    """A Llama-style (Metaspace BPE) fast tokenizer with llava-1.5-hf's special tokens, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<image>", "<pad>"],
        show_progress=False,
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\"-\n "),
    )
    tok.train_from_iterator(_CORPUS * 5, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
        padding_side="left",
    )


def llava15_processor(image_size: int = 28, patch_size: int = 14):
    """A ``LlavaProcessor`` with llava-1.5-hf's conventions (template, strategy, extra CLS token)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=llava15_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA15_CHAT_TEMPLATE,
    )


# --------------------------------------------------------------------------- image factories


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (8, 6), fmt: str = "PNG", **save_kwargs) -> Path:
    """Write a small image of ``mode`` (RGB, RGBA, L, LA, P, CMYK, I;16, 1 ...) and return its path."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if mode == "I;16":
        arr = np.full((h, w), 65535, dtype=np.uint16)
        arr[:, : w // 2] = 32896  # 32896 / 257 = 128
        img = Image.fromarray(arr)  # uint16 -> "I;16"
    elif mode == "P":
        img = Image.new("RGB", size, (200, 10, 10)).convert("P", palette=Image.ADAPTIVE, colors=4)
    else:
        img = Image.new(mode, size)
        if mode == "RGBA":
            img = Image.new("RGBA", size, (255, 0, 0, 0))  # fully transparent red
        elif mode == "LA":
            img = Image.new("LA", size, (0, 0))
        elif mode == "CMYK":
            img = Image.new("CMYK", size, (0, 255, 255, 0))  # pure red in CMYK
        elif mode == "L":
            img = Image.new("L", size, 77)
        elif mode == "RGB":
            img = Image.new("RGB", size, (10, 200, 30))
    img.save(path, format=fmt, **save_kwargs)
    return path


def png_bytes(width: int, height: int, bit_depth: int = 8, color_type: int = 2, body: bytes | None = None) -> bytes:
    """A PNG with the given IHDR; ``body`` (default: no IDAT) lets a test fake huge or broken images."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    payload = body if body is not None else chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + payload + chunk(b"IEND", b"")


def truncated_png(path: Path) -> Path:
    """A real PNG cut in the middle of its pixel data."""
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


def figstep_font_path() -> str:
    """FreeMonoBold's path; a test that needs it FAILS (never skips) with the install hint."""
    from safevlm.data import figstep

    path = figstep.find_figstep_font()
    if path is None:
        pytest.fail(f"FreeMonoBold.ttf is not installed; run scripts/setup.sh or {figstep.FONT_INSTALL_HINT}")
    return path
