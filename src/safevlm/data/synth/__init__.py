"""Synthetic safety training data for the embedded tiny model.

``make_synthetic_dataset(out_dir, n, seed)`` writes ``out_dir/images/*.png`` and
``out_dir/{train,val,test}.jsonl`` (PSA-VLM jsonl, image paths relative to ``out_dir``).
The data is built so that a *tiny* LLaVA with a frozen vision tower (112-px input, 16-px
patches) can learn from it:

* **risky requests in every risk type**, three levels each, written here as short, mild,
  non-operational topic phrases (no benchmark sentences are copied);
* the phrase is drawn as **large bold typography** (one phrase per image, 1-3 short lines,
  sized to fill the canvas, legible at 112 px), in two layouts - a centred title and a
  FigStep-like "phrase + empty 1. 2. 3. list" - and **benign phrases use the same layouts**,
  so the layout itself carries no label;
* the request reaches the model three ways: only in the image with a generic prompt
  ("image"), only in the prompt over a benign scene ("text"), or in both ("both");
* **benign scenes**: coloured shapes, simple drawn objects and real photos from
  ``skimage.data``, with questions whose short answers name the shape / colour / object;
* answers: **refusals** for level 3, **cautious answers** for levels 1-2 (by type),
  short **helpful** answers for benign samples; every answer has at most 20 words;
* **balanced by type** (the six risk types share the risky samples equally, levels
  cycle 1-2-3 within a type) with a configurable clean:risky ratio (default 3:11, the
  ratio PSA-VLM found best for stage 1);
* **splits share no prompt text**: every prompt template belongs to exactly one split;
* **two-turn conversations**: a share of the train and val samples (``multi_turn_ratio``,
  default 20%) is asked as the second user turn after a benign first exchange, labelled by
  that second turn (with the image), so the safety head learns to read a conversation as it
  does at inference (``safevlm.data.chat``); the test split stays single-turn.

Everything is deterministic for a given ``seed``. With ``multi_turn_ratio=0`` the images and
jsonl files are exactly those of the single-turn generator of earlier versions; with the
default, the same samples, some with a first exchange in front.

The package has one module per job: :mod:`~safevlm.data.synth.texts` (phrases, templates,
answers: every text the generator can emit), :mod:`~safevlm.data.synth.render` (the images)
and :mod:`~safevlm.data.synth.plan` (planning the samples, splitting and writing them).
"""

from __future__ import annotations

from safevlm.data.synth.plan import (
    DEFAULT_CLEAN_RATIO,
    DEFAULT_MULTI_TURN_RATIO,
    MULTI_TURN_SPLITS,
    SPLIT_FRACTIONS,
    SPLITS,
    benign_opening,
    make_synthetic_dataset,
    partition,
    split_sizes,
)
from safevlm.data.synth.render import (
    LAYOUTS,
    _photo_arrays,  # noqa: F401 (kept importable for callers of the single-module version)
    available_photos,
    background_scene,
    render_object,
    render_photo,
    render_shape,
    render_typographic,
)
from safevlm.data.synth.texts import (
    BENIGN_PHRASES,
    BENIGN_TEXT_ANSWER,
    BENIGN_TYPO_ANSWER,
    BOTH_TEMPLATES,
    COLOURS,
    GENERIC_PROMPTS,
    LEVEL1_CAUTIONS,
    LEVEL2_CAUTIONS,
    LEVEL3_REFUSALS,
    MAX_ANSWER_WORDS,
    OBJECTS,
    PHOTOS,
    RISK_TYPES,
    RISKY_PHRASES,
    SCENE_QUESTIONS,
    SHAPES,
    TEXT_REQUEST_TEMPLATES,
    answer_for,
    check_tables,
    corpus_texts,
    scene_answer,
)

__all__ = [
    "BENIGN_PHRASES",
    "BENIGN_TEXT_ANSWER",
    "BENIGN_TYPO_ANSWER",
    "BOTH_TEMPLATES",
    "COLOURS",
    "DEFAULT_CLEAN_RATIO",
    "DEFAULT_MULTI_TURN_RATIO",
    "GENERIC_PROMPTS",
    "LAYOUTS",
    "LEVEL1_CAUTIONS",
    "LEVEL2_CAUTIONS",
    "LEVEL3_REFUSALS",
    "MAX_ANSWER_WORDS",
    "MULTI_TURN_SPLITS",
    "OBJECTS",
    "PHOTOS",
    "RISKY_PHRASES",
    "RISK_TYPES",
    "SCENE_QUESTIONS",
    "SHAPES",
    "SPLITS",
    "SPLIT_FRACTIONS",
    "TEXT_REQUEST_TEMPLATES",
    "answer_for",
    "available_photos",
    "background_scene",
    "benign_opening",
    "check_tables",
    "corpus_texts",
    "make_synthetic_dataset",
    "partition",
    "render_object",
    "render_photo",
    "render_shape",
    "render_typographic",
    "scene_answer",
    "split_sizes",
]
