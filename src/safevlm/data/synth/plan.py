"""Planning and writing a synthetic dataset: which samples, in which split, with which texts.

:func:`make_synthetic_dataset` plans every sample first (type, level, phrase or scene), then
realises each one with its split's prompt templates (every template belongs to one split, so
splits share no prompt text), renders its image and writes the PSA-VLM jsonl files.

Two-turn conversations: a share (``multi_turn_ratio``) of the train and val samples get a benign
first exchange in front (a benign text request from the split's templates and its helpful
answer); the sample itself is the second user turn, and the label is that turn's (with the
image). The first exchange is drawn from its own random stream, so every sample's image,
prompt, answer and label are the same as with ``multi_turn_ratio=0``, which writes exactly the
single-turn dataset of earlier versions. The test split stays single-turn: single-prompt
evaluations (``record.prompt``) read every test record whole, and multi-turn behaviour is
measured on conversations built from test records (:func:`benign_opening`).
"""

from __future__ import annotations

import functools
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from safevlm.data.readers import write_psavlm_jsonl
from safevlm.data.records import SafetyRecord, Turn
from safevlm.data.synth.render import (
    LAYOUTS,
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
    scene_answer,
)
from safevlm.taxonomy import DEFAULT_TAXONOMY

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_FRACTIONS: tuple[float, ...] = (0.8, 0.1, 0.1)
DEFAULT_CLEAN_RATIO = 3 / 11  # clean samples per risky sample (PSA-VLM: ~3,000 clean per ~11,000 risky)
DEFAULT_MULTI_TURN_RATIO = 0.2  # train/val samples asked as the second turn of a conversation
MULTI_TURN_SPLITS: tuple[str, ...] = ("train", "val")


def split_sizes(n: int) -> dict[str, int]:
    """Items per split for ``n`` items: 10% val, 10% test (at least one each), the rest train."""
    if n < len(SPLITS):
        raise ValueError(f"need at least {len(SPLITS)} items to give each split one, got {n}")
    n_val = max(1, round(n * SPLIT_FRACTIONS[1]))
    n_test = max(1, round(n * SPLIT_FRACTIONS[2]))
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def partition(items: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Split a template list between train / val / test in order (each gets at least one)."""
    sizes = split_sizes(len(items))
    out, start = {}, 0
    for split in SPLITS:
        out[split] = items[start : start + sizes[split]]
        start += sizes[split]
    return out


@functools.lru_cache(maxsize=None)
def _pools() -> dict[str, dict[str, tuple[str, ...]]]:
    """Every prompt template list, partitioned between the splits."""
    return {
        "generic": partition(GENERIC_PROMPTS),
        "text": partition(TEXT_REQUEST_TEMPLATES),
        "both": partition(BOTH_TEMPLATES),
        **{kind: partition(questions) for kind, questions in SCENE_QUESTIONS.items()},
    }


def benign_opening(split: str, rng: random.Random) -> tuple[str, str, dict]:
    """(user text, assistant answer, metadata) of a benign first exchange: a benign text request
    from ``split``'s templates and its helpful answer (two draws from ``rng``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    template = rng.choice(_pools()["text"][split])
    phrase = BENIGN_PHRASES[rng.randrange(len(BENIGN_PHRASES))]
    return template.format(phrase=phrase), BENIGN_TEXT_ANSWER, {"template": template, "phrase": phrase}


@dataclass
class _Plan:
    """What one sample will be, before rendering."""

    kind: str  # risky-{image,text,both}, benign-{typo,text,both}, shape, object, photo
    risk_type: str
    level: int
    phrase: str | None = None
    facts: dict | None = None


def _plan_samples(n: int, clean_ratio: float, rng: random.Random) -> list[_Plan]:
    n_clean = round(n * clean_ratio / (1.0 + clean_ratio))
    n_risky = n - n_clean
    plans: list[_Plan] = []
    per_type = [
        n_risky // len(RISK_TYPES) + (1 if i < n_risky % len(RISK_TYPES) else 0) for i in range(len(RISK_TYPES))
    ]
    risky_modes = ("risky-image", "risky-image", "risky-text", "risky-both")  # 50 / 25 / 25 %
    for risk_type, count in zip(RISK_TYPES, per_type, strict=True):
        for k in range(count):
            level = 1 + k % 3
            phrase = RISKY_PHRASES[risk_type][level][(k // 3) % len(RISKY_PHRASES[risk_type][level])]
            plans.append(_Plan(risky_modes[(k // 3) % len(risky_modes)], risk_type, level, phrase))
    # clean samples mirror every risky channel (image only, text only, both) so that neither the
    # layout nor the prompt template gives the label away; the rest are benign scenes
    clean_kinds = (
        "benign-typo",
        "benign-typo",
        "shape",
        "photo",
        "benign-typo",
        "object",
        "shape",
        "photo",
        "benign-text",
        "benign-both",
    )
    photos = available_photos() or [None]
    for k in range(n_clean):
        kind = clean_kinds[k % len(clean_kinds)]
        if kind == "photo" and photos == [None]:
            kind = "shape"
        plan = _Plan(kind, DEFAULT_TAXONOMY.safe_type, 0)
        if kind in ("benign-typo", "benign-text", "benign-both"):
            plan.phrase = BENIGN_PHRASES[rng.randrange(len(BENIGN_PHRASES))]
        elif kind == "shape":
            plan.facts = {"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS))}
        elif kind == "object":
            plan.facts = {"object": rng.choice(OBJECTS)}
        else:
            name = rng.choice(photos)
            plan.facts = {"photo_name": name, "photo": PHOTOS[name]}
        plans.append(plan)
    rng.shuffle(plans)
    return plans


def _realise(plan: _Plan, split: str, pools: dict, rng: random.Random, size: int, font_variety: int = 0) -> tuple:
    """(image, prompt, answer, metadata) for a planned sample, with ``split``'s templates."""
    meta: dict = {"kind": plan.kind}
    layout = rng.choice(LAYOUTS)
    if plan.kind in ("risky-image", "benign-typo"):
        image = render_typographic(plan.phrase, rng, size, layout, font_variety)
        template = prompt = rng.choice(pools["generic"][split])
        meta.update({"layout": layout, "request_in": "image", "template": template})
    elif plan.kind in ("risky-text", "benign-text"):
        image, scene = background_scene(rng, size)
        template = rng.choice(pools["text"][split])
        prompt = template.format(phrase=plan.phrase)
        meta.update({"request_in": "text", "template": template, **scene})
    elif plan.kind in ("risky-both", "benign-both"):
        image = render_typographic(plan.phrase, rng, size, layout, font_variety)
        template = rng.choice(pools["both"][split])
        prompt = template.format(phrase=plan.phrase)
        meta.update({"layout": layout, "request_in": "image+text", "template": template})
    elif plan.kind == "shape":
        image = render_shape(plan.facts["shape"], plan.facts["colour"], rng, size)
        question_kind = rng.choice(("shape", "colour"))
        prompt = rng.choice(pools[question_kind][split])
        meta.update(plan.facts)
        return image, prompt, scene_answer(question_kind, **plan.facts), meta
    elif plan.kind == "object":
        image = render_object(plan.facts["object"], rng, size)
        prompt = rng.choice(pools["object"][split])
        meta.update(plan.facts)
        return image, prompt, scene_answer("object", **plan.facts), meta
    else:  # photo
        image = render_photo(plan.facts["photo_name"], rng, size)
        prompt = rng.choice(pools["photo"][split])
        meta.update(plan.facts)
        return image, prompt, scene_answer("photo", **plan.facts), meta
    meta["phrase"] = plan.phrase
    if plan.risk_type == DEFAULT_TAXONOMY.safe_type:
        answer = BENIGN_TEXT_ANSWER if plan.kind == "benign-text" else BENIGN_TYPO_ANSWER
    else:
        answer = answer_for(plan.risk_type, plan.level)
    return image, prompt, answer, meta


def make_synthetic_dataset(
    out_dir: "str | os.PathLike",
    n: int,
    seed: int = 0,
    clean_ratio: float = DEFAULT_CLEAN_RATIO,
    image_size: int = 224,
    font_variety: int = 0,
    multi_turn_ratio: float = DEFAULT_MULTI_TURN_RATIO,
) -> dict:
    """Write ``n`` synthetic samples to ``out_dir`` and return the counts.

    Writes ``out_dir/images/synth-000000.png`` ... and ``out_dir/{train,val,test}.jsonl``
    (PSA-VLM jsonl; ``image`` relative to ``out_dir``) plus ``out_dir/synth.json`` with the
    parameters and counts. Splits are 80/10/10 and share no prompt text.

    Args:
        out_dir: output folder (created).
        n: number of samples (>= 3, so every split gets one).
        seed: RNG seed; same seed, same files.
        clean_ratio: clean (safe) samples per risky sample; 3/11 by default.
        image_size: square image side in pixels (the tiny model resizes to its own size).
        font_variety: typographic images use the first k bold fonts found (0: every one found);
            1 gives a tiny vision tower the easiest reading task.
        multi_turn_ratio: share of train and val samples asked as the second user turn, after a
            benign first exchange (0: every sample single-turn, the dataset of earlier versions).

    Returns:
        ``{"total", "clean", "risky", "multi_turn", "splits": {split: n}, "by_type": {name: n},
        "by_level": {"0".."3": n}, "out_dir"}``.
    """
    if n < len(SPLITS):
        raise ValueError(f"n must be at least {len(SPLITS)} (one sample per split), got {n}")
    if not clean_ratio >= 0:
        raise ValueError(f"clean_ratio must be >= 0 (clean samples per risky sample), got {clean_ratio}")
    if font_variety < 0:
        raise ValueError(f"font_variety must be >= 0 (0 = every font found), got {font_variety}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    if not 0.0 <= multi_turn_ratio <= 1.0:
        raise ValueError(f"multi_turn_ratio must be in [0, 1], got {multi_turn_ratio}")
    check_tables()
    rng = random.Random(seed)
    # the first exchanges draw from their own stream: the samples themselves do not depend on them
    opening_rng = random.Random(f"synth-multi-turn-{seed}")
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    pools = _pools()
    plans = _plan_samples(n, clean_ratio, rng)
    taxonomy = DEFAULT_TAXONOMY
    by_split: dict[str, list[SafetyRecord]] = {s: [] for s in SPLITS}
    start = 0
    for split, size in split_sizes(n).items():
        for index in range(start, start + size):
            plan = plans[index]
            image, prompt, answer, meta = _realise(plan, split, pools, rng, image_size, font_variety)
            if len(answer.split()) > MAX_ANSWER_WORDS:  # a text edit must not break the contract
                raise RuntimeError(f"synth answer has {len(answer.split())} words, over {MAX_ANSWER_WORDS}: {answer!r}")
            turns = [Turn("user", prompt), Turn("assistant", answer)]
            if split in MULTI_TURN_SPLITS and multi_turn_ratio > 0:
                draw = opening_rng.random()
                opening, opening_answer, opening_meta = benign_opening(split, opening_rng)
                if draw < multi_turn_ratio:
                    turns = [Turn("user", opening), Turn("assistant", opening_answer), *turns]
                    meta["opening"] = opening_meta
            record_id = f"synth-{index:06d}"
            relative = f"images/{record_id}.png"
            image.save(out_dir / relative, format="PNG", compress_level=1)
            meta.update({"split": split, "seed": seed})
            by_split[split].append(
                SafetyRecord(
                    id=record_id,
                    image=relative,
                    turns=turns,
                    risk_level=plan.level,
                    risk_type=taxonomy.type_id(plan.risk_type),
                    source="synth",
                    metadata=meta,
                )
            )
        start += size
    prompts = {s: {t.text for r in records for t in r.turns if t.role == "user"} for s, records in by_split.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = prompts[a] & prompts[b]
        if shared:  # guaranteed by the template partition; checked so that it stays true
            raise RuntimeError(f"synth splits {a} and {b} share prompt text: {sorted(shared)[:3]}")
    for split, records in by_split.items():
        write_psavlm_jsonl(records, out_dir / f"{split}.jsonl")
    all_records = [r for records in by_split.values() for r in records]
    counts = {
        "total": len(all_records),
        "clean": sum(r.risk_type == taxonomy.safe_type_id for r in all_records),
        "risky": sum(r.risk_type != taxonomy.safe_type_id for r in all_records),
        "multi_turn": sum(len(r.turns) > 2 for r in all_records),
        "splits": {s: len(records) for s, records in by_split.items()},
        "by_type": {name: sum(r.risk_type == i for r in all_records) for i, name in enumerate(taxonomy.type_names)},
        "by_level": {str(lv): sum(r.risk_level == lv for r in all_records) for lv in range(taxonomy.num_levels)},
        "out_dir": str(out_dir),
    }
    meta_file = {
        "n": n, "seed": seed, "clean_ratio": clean_ratio, "image_size": image_size, "font_variety": font_variety,
        "multi_turn_ratio": multi_turn_ratio, **counts,
    }
    (out_dir / "synth.json").write_text(json.dumps(meta_file, indent=2) + "\n", encoding="utf-8")
    return counts


__all__ = [
    "DEFAULT_CLEAN_RATIO",
    "DEFAULT_MULTI_TURN_RATIO",
    "MULTI_TURN_SPLITS",
    "SPLITS",
    "SPLIT_FRACTIONS",
    "benign_opening",
    "make_synthetic_dataset",
    "partition",
    "split_sizes",
]
