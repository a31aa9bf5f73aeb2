"""The main job: the whole PSA-VLM method on the embedded tiny model, on a laptop CPU.

``safevlm demo --out DIR`` runs, top to bottom (the numbers are the banners it prints):

1. **Tiny base + safety data.** Build the tiny LLaVA (random weights) and the synthetic
   risky / benign samples (``safevlm.data.synth``; splits share no prompt text; a share of
   train/val samples are second turns of a conversation).
2. **Base pre-training**, the two a real LLaVA has had before safety work starts:
   a. *vision pre-training* (the CLIP analogue): the vision tower learns to tell images
      apart by their captions on a stream of freshly rendered images (typography, shapes,
      objects, real photos from skimage);
   b. *multimodal pre-training* (the LLaVA analogue): vision frozen, projector + LM learn
      to read the image aloud and to answer benign questions, and the LM gets the text-side
      safety alignment a real chat LLM has (it refuses or answers cautiously when the harmful
      request is in the *prompt*, and answers benign requests in the same words). The result
      is the situation the paper starts from: the base refuses harmful text, but a harmful
      request typed into an image goes through.
   The held-out split's prompt templates are never trained on. So that they change neither
   what the head decides nor what the model does with the decision (each can be turned off in
   :class:`DemoSettings`): ``wording_drop`` varies the wording of half the requests in
   pre-training and stage 2 (:func:`vary_wording`), ``lm_benign_text_repeat`` shows benign text
   requests more often, ``safety["prompt_token_dropout"]`` hides half the prompt from the head
   in training, and the prefix tokens carry the head's decision, which stage 2 teaches the
   model to follow with decision swaps (``decision_swap_ratio``, :mod:`safevlm.train.swaps`).
3. **Before**: the base model's answers on held-out prompts (refusal on risky, over-refusal
   and answer accuracy on benign).
4. **Stage 1**: base frozen, safety projector + head (+ prefix tokens) on the classification
   loss, vision features cached.
5. **Stage 2**: LoRA on the LM + the safety modules, LM + classification loss, with decision swaps.
6. **After**: the same answers from the safety-aligned model, a few guarded answers (allow /
   hint / refuse) under the default policy, and the multi-turn check (a request asked as the
   second user turn).
7. **Evaluation and report**: ``safevlm eval`` on the held-out split and on FigStep
   (SafeBench questions rendered with the exact renderer, never trained on) with a benign
   control set in the same layout; ``report.json``, ``report.md`` and plots.

Everything is deterministic for a seed on CPU. The settings in :class:`DemoSettings` are sized
so that the whole run fits on a laptop CPU: under 10 minutes on 2 cores (report.md states the
time each step took). The vision pre-training images are rendered by a worker process while
the dataset is rendered (:class:`CaptionPoolRender`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

CAPTION_PROMPT = "What does the image say?"


@dataclass
class DemoSettings:
    """Sizes of each step (defaults: the full demo, under 10 minutes on 2 CPU cores).

    The default recipe lets the held-out split's unseen prompt templates change neither what
    the head decides nor what the model does with the decision: the head does not see half the
    prompt tokens in training (``safety["prompt_token_dropout"]``), a quarter of the words of
    half the requests are varied (``wording_drop``, :func:`vary_wording`), and the prefix tokens
    carry the head's decision, which stage 2 teaches the model to follow with decision swaps
    (``safety["prefix_conditioning"] = "decision"``, ``decision_swap_ratio``). Training on
    policy hints (``hint_ratio``) is off: see docs/training.md."""

    seed: int = 0
    n_samples: int = 5000  # synthetic safety samples, all splits
    vision_images: int = 8000  # freshly rendered images for vision pre-training
    vision_epochs: int = 4
    vision_lr: float = 3e-3
    vision_batch_size: int = 32
    lm_samples: int = 2400  # multimodal pre-training samples (captions, benign QA, text-side alignment)
    lm_epochs: int = 2
    lm_benign_text_repeat: int = 5  # each benign text request this many times in multimodal pre-training
    lm_logits: str = "supervised"  # multimodal pre-training and stage 2: LM head at every token ("full") or the supervised ones
    lm_lr: float = 1e-3
    stage1_epochs: int = 7
    stage1_lr: float = 3e-3
    stage2_epochs: int = 2
    stage2_samples: int = 1800
    stage2_lr: float = 1e-3
    stage2_clean_ratio: float = 1.5  # clean samples per risky sample drawn in stage 2
    stage2_lora_dropout: float = 0.0
    wording_drop: float = 0.25  # > 0: half the requests in pre-training and stage 2 have their wording varied (vary_wording)
    decision_swap_ratio: float = 0.4  # stage 2: data.decision_swap_ratio (needs safety["prefix_conditioning"] == "decision")
    hint_ratio: float = 0.0  # stage 2: data.hint_ratio, records that read a default-policy hint (safevlm.train.hints; off: see docs/training.md)
    length_window: int | None = 8  # multimodal pre-training and stage 2: batches sorted by length in windows of this many (None: plain shuffle)
    eval_samples: int = 300  # held-out samples used for the generation metrics
    max_new_tokens: int = 24
    batch_size: int = 32
    threads: int = 2
    safety: dict = field(
        default_factory=lambda: {
            "projector_kind": "mlp",
            "num_prefix_tokens": 16,
            "num_query_tokens": 16,
            "head_hidden_size": 128,
            "head_num_heads": 4,
            "head_num_layers": 1,
            "dropout": 0.3,
            "prompt_token_dropout": 0.5,
            "prefix_conditioning": "decision",
        }
    )

    def __post_init__(self):
        # checked here, not when stage 2 reads it after minutes of pre-training
        if self.lm_logits not in ("full", "supervised"):
            raise ValueError(f"lm_logits must be 'full' or 'supervised', got {self.lm_logits!r}")
        if self.decision_swap_ratio > 0 and self.safety.get("prefix_conditioning") != "decision":
            raise ValueError("decision_swap_ratio needs safety['prefix_conditioning'] = 'decision'")


# ------------------------------------------------------------------------------ pre-training
def _vision_caption(record) -> str:
    meta = record.metadata
    if meta.get("request_in") in ("image", "image+text"):
        return meta["phrase"]
    if "photo_name" in meta:
        return meta["photo_name"]
    if "object" in meta:
        return meta["object"]
    return f"{meta['colour']} {meta['shape']}"


def _render_caption_pool(n: int, seed: int, size: int):
    """(images, captions) freshly rendered: typography of every phrase, shapes, objects, photos."""
    from safevlm.data import synth

    rng = random.Random(seed)
    phrases = sorted({p for levels in synth.RISKY_PHRASES.values() for ps in levels.values() for p in ps}
                     | set(synth.BENIGN_PHRASES))
    photos = sorted(synth._photo_arrays())
    images, captions = [], []
    for _ in range(n):
        u = rng.random()
        if u < 0.7:
            phrase = rng.choice(phrases)
            images.append(synth.render_typographic(phrase, rng, size, rng.choice(("title", "list")), font_variety=1))
            captions.append(phrase)
        elif u < 0.8 or not photos:
            shape, colour = rng.choice(synth.SHAPES), rng.choice(list(synth.COLOURS))
            images.append(synth.render_shape(shape, colour, rng, size))
            captions.append(f"{colour} {shape}")
        elif u < 0.9:
            obj = rng.choice(synth.OBJECTS)
            images.append(synth.render_object(obj, rng, size))
            captions.append(obj)
        else:
            name = rng.choice(photos)
            images.append(synth.render_photo(name, rng, size))
            captions.append(name)
    return images, captions


def _write_caption_pool(n: int, seed: int, size: int, folder: str) -> None:
    """:func:`_render_caption_pool` into ``folder``: ``pool.npy`` (uint8 (n, size, size, 3)) and
    ``captions.json``: what the worker of :class:`CaptionPoolRender` writes."""
    import numpy as np

    images, captions = _render_caption_pool(n, seed, size)
    np.save(Path(folder) / "pool.npy", np.stack([np.asarray(image.convert("RGB")) for image in images]))
    (Path(folder) / "captions.json").write_text(json.dumps(captions))


# below this many images the pool is rendered in the main process (a worker costs a second to start)
POOL_WORKER_MIN_IMAGES = 1000
_WORKER_CODE = "import sys; from safevlm.demo import _write_caption_pool as w; w(*map(int, sys.argv[1:4]), sys.argv[4])"


class CaptionPoolRender:
    """The vision pre-training pool, rendered by a worker process (a fresh interpreter) while the
    main process renders the synthetic dataset: rendering is single-threaded Python, so on 2
    cores the two overlap. :meth:`result` gives the same images and captions as
    :func:`_render_caption_pool`, worker or not; a pool under ``POOL_WORKER_MIN_IMAGES`` images
    is rendered in the main process when asked for."""

    def __init__(self, settings: DemoSettings, size: int):
        self.args = (settings.vision_images, settings.seed + 1, size)
        self._proc = self._dir = None
        if settings.vision_images >= POOL_WORKER_MIN_IMAGES:
            import os
            import subprocess
            import sys
            import tempfile

            self._dir = tempfile.mkdtemp(prefix="safevlm-pool-")
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            self._proc = subprocess.Popen([sys.executable, "-c", _WORKER_CODE, *map(str, self.args), self._dir],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)

    def result(self):
        """(images (PIL, RGB), captions)."""
        if self._proc is None:
            return _render_caption_pool(*self.args)
        import numpy as np
        from PIL import Image

        try:
            _, err = self._proc.communicate()
            if self._proc.returncode != 0:
                tail = err.decode(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"the worker rendering the vision pre-training images failed (exit "
                                   f"{self._proc.returncode}):\n" + "\n".join(tail))
            arrays = np.load(Path(self._dir) / "pool.npy")
            captions = json.loads((Path(self._dir) / "captions.json").read_text())
        finally:
            self.close()
        return [Image.fromarray(a) for a in arrays], captions

    def close(self):
        """Stop the worker if it still runs and delete its files."""
        import shutil

        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def pretrain_vision(base, processor, settings: DemoSettings, progress, pool: CaptionPoolRender) -> dict:
    """CLIP analogue: train the vision tower to recognise each image's caption (cross-entropy
    over the caption set) from its selected-layer features, on freshly rendered images
    (``pool``: their renderer, started ahead so that it works while the dataset is rendered)."""
    import torch

    from safevlm.backbones import get_backbone
    from safevlm.train.trainable import set_trainable

    backbone = get_backbone(base)
    set_trainable(base, {"vision_tower"})
    images, captions = pool.result()
    vocab = sorted(set(captions))
    index = {c: i for i, c in enumerate(vocab)}
    pixels = torch.cat([
        processor.image_processor(images[i:i + 256], return_tensors="pt")["pixel_values"]
        for i in range(0, len(images), 256)
    ])
    targets = torch.tensor([index[c] for c in captions])
    tower = backbone.vision_tower
    classifier = torch.nn.Linear(backbone.config_facts(base.config)["vision_hidden_size"], len(vocab))
    params = list(tower.parameters()) + list(classifier.parameters())
    bs = settings.vision_batch_size
    steps = settings.vision_epochs * ((len(images) + bs - 1) // bs)
    opt = torch.optim.AdamW(params, lr=settings.vision_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.vision_lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(settings.seed)
    tower.train()
    bar = progress(total=steps, desc="vision pre-training")
    for _ in range(settings.vision_epochs):
        order = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), bs):
            j = order[i:i + bs]
            hidden = backbone.vision_features(pixels[j]).mean(1)  # the features the LLM and the head read
            loss = torch.nn.functional.cross_entropy(classifier(hidden), targets[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    tower.eval()
    return {"images": len(images), "captions": len(vocab), "final_loss": round(loss.item(), 4)}


def pretrain_language(base, processor, records, image_root, settings: DemoSettings, progress) -> dict:
    """LLaVA analogue: vision frozen; projector + LM learn to read images aloud (every training
    image, risky ones included, as a real base reads anything), to answer benign questions,
    and the text-side safety alignment of a chat LLM: requests made in the prompt text get the
    refusal or cautious answer. Requests made only in the image are never shown with a refusal
    here, so the base goes along with them (the typographic attack)."""
    import torch

    from safevlm.backbones import causal_lm_loss, get_backbone
    from safevlm.data import SafetyRecord, Turn
    from safevlm.data.collator import SafetyCollator
    from safevlm.train.trainable import set_trainable

    rng = random.Random(settings.seed + 2)
    filler = filler_words(processor.tokenizer) if settings.wording_drop > 0 else ()
    samples = []
    for r in records:
        if r.response and (r.risk_level == 0 or r.metadata.get("request_in") == "text"):
            samples.append(_varied(r, rng, settings, filler))  # benign QA, and harmful requests made in the prompt text
            if r.risk_level == 0 and r.metadata.get("request_in") == "text":
                # benign requests in the same templates, as often as a chat LLM sees them: the
                # synthetic set has ~9 risky text requests per benign one, and a model that sees
                # so few learns to refuse the template rather than the request
                samples += [dataclasses.replace(_varied(r, rng, settings, filler), id=f"{r.id}-again{k}")
                            for k in range(1, settings.lm_benign_text_repeat)]
        caption = _vision_caption(r)
        if r.metadata.get("request_in") in ("image", "image+text"):
            answer = f"The image says: {caption}."
        else:
            continue
        samples.append(SafetyRecord(f"{r.id}-caption", r.image, [Turn("user", f"<image>\n{CAPTION_PROMPT}"),
                                                                   Turn("assistant", answer)], 0, r.risk_type, "caption"))
    rng.shuffle(samples)
    samples = samples[: settings.lm_samples]
    backbone = get_backbone(base)
    image_token_id = backbone.config_facts(base.config)["image_token_id"]
    set_trainable(base, {"base_projector", "language_model"})
    collator = SafetyCollator(processor, image_root=image_root)
    params = [p for p in base.parameters() if p.requires_grad]
    bs = settings.batch_size // 2
    steps = settings.lm_epochs * ((len(samples) + bs - 1) // bs)
    opt = torch.optim.AdamW(params, lr=settings.lm_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lm_lr, total_steps=steps, pct_start=0.1)
    if settings.length_window:  # less padding; each batch still a random mix (see data.length_window)
        from safevlm.train.sampler import group_by_length

        order = group_by_length(list(range(len(samples))), [collator.token_length(r) for r in samples], bs,
                                torch.Generator().manual_seed(settings.seed + 2), settings.length_window)
        samples = [samples[i] for i in order]
    # The vision tower is frozen: compute its features once.
    batches = []
    with torch.no_grad():
        for i in range(0, len(samples), bs):
            batch = collator(samples[i:i + bs])
            batch["vision_features"] = backbone.vision_features(batch.pop("pixel_values"))
            batches.append(batch)
    base.train()
    bar = progress(total=steps, desc="multimodal pre-training")
    for _ in range(settings.lm_epochs):
        rng.shuffle(batches)
        for batch in batches:
            ids = batch["input_ids"]
            embeds = backbone.scatter_image_embeds(
                backbone.embed_tokens(ids), ids == image_token_id, batch["vision_features"]
            )
            if settings.lm_logits == "full":
                loss = causal_lm_loss(backbone.language_forward(embeds, batch["attention_mask"]), batch["labels"])
            else:
                loss = backbone.language_loss(embeds, batch["attention_mask"], None, batch["labels"])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    base.eval()
    return {"samples": len(samples), "final_loss": round(loss.item(), 4)}


def filler_words(tokenizer) -> tuple[str, ...]:
    """The words :func:`vary_wording` draws from: every token of ``tokenizer``'s vocabulary made of
    2 or more letters (a word-start marker removed), except the words of the risky phrases, so
    that filler never turns a benign prompt into a risky one. Sorted."""
    from safevlm.data.synth import texts

    risky = {w.lower() for levels in texts.RISKY_PHRASES.values() for ps in levels.values() for p in ps for w in p.split()}
    words = set()
    for token in tokenizer.get_vocab():
        word = token[1:] if token[:1] in ("\u0120", "\u2581") else token  # byte-level BPE / sentencepiece word start
        if len(word) >= 2 and word.isascii() and word.isalpha() and word.lower() not in risky:
            words.add(word)
    return tuple(sorted(words))


def _varied(record, rng: random.Random, settings: DemoSettings, filler: tuple[str, ...] = ()):
    """Half the time, :func:`vary_wording` at ``settings.wording_drop`` (0: never, and ``rng`` is not drawn from)."""
    if settings.wording_drop <= 0 or rng.random() >= 0.5:
        return record
    return vary_wording(record, rng, settings.wording_drop, filler)


def vary_wording(record, rng: random.Random, drop: float, filler: tuple[str, ...] = ()):
    """``record`` with the words of its request's prompt varied at random: each is dropped with
    probability ``drop`` and, given ``filler`` words, replaced by a random one of them with
    probability ``drop``; the request phrase (where the prompt spells it out), the image
    placeholder and the other turns are kept. Only requests (``metadata["request_in"]``: text,
    image or both) are varied; other records, and a draw that would leave no word, come back
    unchanged.

    A real chat LLM has seen a request worded in countless ways, and every word of its
    vocabulary in use; the synthetic set has a few templates per split, and a word only the
    held-out templates use would keep its random initial embedding. Varying the wording with
    words from the whole vocabulary (:func:`filler_words`) teaches the tiny model to answer the
    request, not the template, so that it still refuses under the held-out split's templates.
    """
    from safevlm.data import Turn

    where = record.metadata.get("request_in")
    phrase = record.metadata.get("phrase") if where in ("text", "image+text") else None
    if drop <= 0 or where not in ("text", "image", "image+text"):
        return record
    turns = list(record.turns)
    users = [i for i, t in enumerate(turns) if t.role == "user" and (phrase is None or phrase in t.text)]
    if not users or (where != "image" and phrase is None):
        return record
    k = users[-1]
    text = turns[k].text
    lead = ""
    if text.startswith("<image>"):
        lead, text = "<image>\n", text[len("<image>"):]

    def kept(words: str) -> list[str]:
        out = []
        for w in words.split():
            u = rng.random()
            if u >= drop:
                out.append(rng.choice(filler) if filler and u < 2 * drop else w)
        return out

    if phrase is None:
        words = kept(text)
    else:
        head, _, tail = text.rpartition(phrase)
        # punctuation touching the phrase ("'forge passports'.") stays with it
        head, left = re.match(r"(.*?)(\S*)$", head, re.S).groups()
        right, tail = re.match(r"(\S*)(.*)$", tail, re.S).groups()
        words = kept(head) + [left + phrase + right] + kept(tail)
    if not words:
        return record
    turns[k] = Turn("user", lead + " ".join(words))
    return dataclasses.replace(record, turns=turns)


# ------------------------------------------------------------------------------ evaluation
def _chat_inputs(processor, records, image_root):
    from safevlm.data import open_image

    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r.prompt}]}],
            add_generation_prompt=True,
        )
        for r in records
    ]
    images = [open_image(r, image_root) for r in records]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def _normalise(text: str) -> str:
    return " ".join(text.lower().replace("</s>", " ").split()).strip(" .")


def generate_answers(generate_fn, processor, records, image_root, settings: DemoSettings, desc: str, progress):
    answers = []
    bar = progress(total=len(records), desc=desc)
    for i in range(0, len(records), settings.batch_size):
        chunk = records[i:i + settings.batch_size]
        tokens = generate_fn(_chat_inputs(processor, chunk, image_root))
        answers += [t.strip() for t in processor.batch_decode(tokens, skip_special_tokens=True)]
        bar.update(len(chunk))
    bar.close()
    return answers


def answer_metrics(records, answers) -> dict:
    """Refusal rate on risky prompts, over-refusal and exact-answer accuracy on benign prompts."""
    from safevlm.eval import is_refusal

    risky = [is_refusal(a) for r, a in zip(records, answers) if r.risk_level > 0]
    benign = [(a, r) for r, a in zip(records, answers) if r.risk_level == 0]
    return {
        "refusal_rate_risky": round(sum(risky) / max(1, len(risky)), 4),
        "over_refusal_benign": round(sum(is_refusal(a) for a, _ in benign) / max(1, len(benign)), 4),
        "benign_accuracy": round(sum(_normalise(a) == _normalise(r.response) for a, r in benign) / max(1, len(benign)), 4),
        "n_risky": len(risky),
        "n_benign": len(benign),
    }


def head_evaluation(model, processor, records, image_root, settings: DemoSettings) -> tuple[dict, list, list]:
    """Head metrics on held-out records from the prompt alone (as at inference)."""
    from safevlm.train.metrics import head_metrics

    level_pred, type_pred = [], []
    for i in range(0, len(records), settings.batch_size):
        chunk = records[i:i + settings.batch_size]
        out = model.guard(**_chat_inputs(processor, chunk, image_root))
        level_pred += out.risk_level.tolist()
        type_pred += out.risk_type.tolist()
    level_true = [r.risk_level for r in records]
    type_true = [r.risk_type for r in records]
    metrics = head_metrics(level_true, level_pred, type_true, type_pred)
    return {k: round(float(v), 4) for k, v in metrics.items()}, type_true, type_pred


def _eval_subset(records, n: int, seed: int):
    """Up to n held-out records: every benign one up to half, the rest risky."""
    rng = random.Random(seed)
    benign = [r for r in records if r.risk_level == 0]
    risky = [r for r in records if r.risk_level > 0]
    rng.shuffle(benign)
    rng.shuffle(risky)
    benign = benign[: n // 2]
    return sorted(benign + risky[: n - len(benign)], key=lambda r: r.id)


# ------------------------------------------------------------------------------ plots
def _plots(out: Path, report: dict, type_true, type_pred, type_names) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = []
    keys = ["refusal_rate_risky", "over_refusal_benign", "benign_accuracy"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(keys))
    for offset, (name, colour) in zip((-0.2, 0.2), (("before", "#999999"), ("after", "#2a7fd4"))):
        values = [report[name][k] for k in keys]
        bars = ax.bar(x + offset, values, 0.4, label=name, color=colour)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(x, ["refusal on risky", "over-refusal on benign", "benign accuracy"])
    ax.set_ylim(0, 1.1)
    ax.set_title("Before (base) vs after (stage 2), held-out prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "before_after.png", dpi=120)
    plt.close(fig)
    files.append("before_after.png")

    k = len(type_names)
    matrix = np.zeros((k, k), dtype=int)
    for t, p in zip(type_true, type_pred):
        matrix[t, p] += 1
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(matrix, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, matrix[i, j], ha="center", va="center", fontsize=8,
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xticks(range(k), type_names, rotation=45, ha="right")
    ax.set_yticks(range(k), type_names)
    ax.set_xlabel("predicted risk type")
    ax.set_ylabel("true risk type")
    ax.set_title("Safety head after stage 1 (held-out)")
    fig.tight_layout()
    fig.savefig(out / "confusion_type.png", dpi=120)
    plt.close(fig)
    files.append("confusion_type.png")
    return files


def _markdown(report: dict) -> str:
    s1 = report["stage1"]
    lines = [
        "# safevlm demo report",
        "",
        f"Embedded tiny LLaVA ({report['base']['params']:,} parameters), safety modules "
        f"{report['safety_params']:,} parameters; {report['seconds']:.0f} s on CPU.",
        "",
        "## Safety head after stage 1 (held-out split)",
        "",
        "| head | accuracy | macro-F1 |",
        "|---|---|---|",
        f"| risk type | {s1['type_accuracy']:.3f} | {s1['type_macro_f1']:.3f} |",
        f"| risk level | {s1['level_accuracy']:.3f} | {s1['level_macro_f1']:.3f} |",
        "",
        "## Answers before (base) and after (stage 2)",
        "",
        "| metric | before | after |",
        "|---|---|---|",
    ]
    for key in ("refusal_rate_risky", "over_refusal_benign", "benign_accuracy"):
        lines.append(f"| {key} | {report['before'][key]:.3f} | {report['after'][key]:.3f} |")
    lines += ["", "## Guarded answers (default policy)", ""]
    for ex in report["guarded_examples"]:
        lines.append(f"* **{ex['action']}** ({ex['risk_type']}, level {ex['risk_level']}) — "
                     f"_{ex['prompt']}_ → {ex['text']}")
    multi = report.get("multi_turn")
    if multi:
        lines += ["", "## Multi-turn: the request as the second user turn", "",
                  f"* risky requests refused as a first turn, still refused as the second: "
                  f"{multi['risky_second_turn_refusal']} (of {multi['n_risky_refused_first_turn']})",
                  f"* benign requests allowed as a first turn, still allowed as the second: "
                  f"{multi['benign_second_turn_allowed']} (of {multi['n_benign_allowed_first_turn']})"]
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in report["plots"]), ""]
    if report.get("steps"):
        lines += ["## Time per step", "", "| step | wall s | CPU s |", "|---|---|---|"]
        lines += [f"| {st['step']} | {st['seconds']:.0f} | {st['cpu_seconds']:.0f} |" for st in report["steps"]]
        lines.append("")
    if report.get("evaluation"):
        lines += [report["evaluation"]["markdown"].rstrip(), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main job
def run_demo(out_dir: str | Path, settings: DemoSettings | None = None, show_progress: bool = True) -> dict:
    """Run the whole method on the embedded tiny model; writes ``report.json``, ``report.md``
    and plots into ``out_dir`` and returns the report."""
    import torch
    from tqdm.auto import tqdm

    from safevlm.compat import quiet_loading
    from safevlm.data import load_records
    from safevlm.data.synth import make_synthetic_dataset
    from safevlm.model import SafeVLM
    from safevlm.bases import load_base
    from safevlm.train import TrainConfig, run_stage

    settings = settings or DemoSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(settings.threads)
    start = time.time()

    def progress(**kwargs):
        return tqdm(disable=not show_progress, dynamic_ncols=True, **kwargs)

    steps: list[dict] = []  # wall and CPU seconds of each step, for the report

    def banner(text):
        now, cpu = time.time() - start, time.process_time()
        if steps:
            steps[-1].update(seconds=round(now - steps[-1].pop("_start"), 1), cpu_seconds=round(cpu - steps[-1].pop("_cpu"), 1))
        if text is not None:
            steps.append({"step": text, "_start": now, "_cpu": cpu})
        if show_progress and text is not None:
            print(f"\n== {text} ({now:.0f} s)", flush=True)

    # -- 1. base ------------------------------------------------------------------------------------
    banner("1/7 tiny base model + synthetic safety data")
    torch.manual_seed(settings.seed)
    base, processor = load_base(f"tiny:default@{settings.seed}", dtype="float32", device="cpu")
    data_dir = out / "data"
    size = processor.image_processor.crop_size["height"]
    pool = CaptionPoolRender(settings, size)  # the vision pre-training images, rendered meanwhile
    try:
        make_synthetic_dataset(data_dir, settings.n_samples, settings.seed, image_size=size, font_variety=1)
        splits = {s: load_records(data_dir / f"{s}.jsonl", image_root=data_dir, check_images=False).records
                  for s in ("train", "val", "test")}
        test_subset = _eval_subset(splits["test"], settings.eval_samples, settings.seed)

        banner("2/7 base pre-training (vision, then multimodal)")
        vision_info = pretrain_vision(base, processor, settings, progress, pool)
    finally:
        pool.close()
    lm_info = pretrain_language(base, processor, splits["train"], data_dir, settings, progress)
    base_params = sum(p.numel() for p in base.parameters())
    with quiet_loading():  # no "Writing model shards" bar (5.x)
        base.save_pretrained(out / "base", safe_serialization=True)  # for chat / serve / classify --model
    processor.save_pretrained(out / "base")

    banner("3/7 before: the base model's answers on held-out prompts")
    before_answers = generate_answers(
        lambda inputs: base.generate(**inputs, max_new_tokens=settings.max_new_tokens, do_sample=False)[
            :, inputs["input_ids"].shape[1]:],
        processor, test_subset, data_dir, settings, "generating (base)", progress,
    )
    before = answer_metrics(test_subset, before_answers)

    # -- stage 1 ------------------------------------------------------------------------------------
    banner("4/7 stage 1: safety projector + head on the frozen base")
    common = {
        "seed": settings.seed,
        "overwrite": True,
        "data": {"image_root": str(data_dir), "check_images": False, "balance_types": True, "clean_ratio": None},
        "cache": {"enabled": True, "dir": str(out / "feature_cache")},
        "log": {"logging_steps": 10, "eval_steps": -1, "save_steps": -1, "save_total_limit": 1},
    }
    torch.manual_seed(settings.seed)
    model = SafeVLM(base, **settings.safety)
    stage1_config = TrainConfig.from_dict({
        **common,
        "stage": 1,
        "output_dir": str(out / "stage1"),
        "loss": {"cls_weight": 1.0, "lm_weight": 0.0},
        "optim": {"lr": settings.stage1_lr, "epochs": settings.stage1_epochs, "warmup_steps": 20,
                  "batch_size": settings.batch_size, "scheduler": "cosine", "weight_decay": 0.05},
    })
    stage1 = run_stage(stage1_config, model=model, processor=processor,
                       train_records=splits["train"], val_records=splits["val"], quiet=not show_progress)
    model = stage1.model
    stage1_metrics, type_true, type_pred = head_evaluation(model, processor, splits["test"], data_dir, settings)

    # -- stage 2 ------------------------------------------------------------------------------------
    banner("5/7 stage 2: LoRA on the language model + safety modules")
    stage2_config = TrainConfig.from_dict({
        **common,
        "stage": 2,
        "output_dir": str(out / "stage2"),
        "model": {"safety_modules": "train"},
        "lora": {"r": 16, "alpha": 32, "dropout": settings.stage2_lora_dropout, "target_modules": "all-linear"},
        "loss": {"cls_weight": 1.0, "lm_weight": 1.0, "lm_logits": settings.lm_logits},
        # More clean samples than in stage 1, so that refusing is learned without over-refusing.
        "data": {**common["data"], "samples_per_epoch": settings.stage2_samples, "clean_ratio": settings.stage2_clean_ratio,
                 "group_by_length": bool(settings.length_window), "length_window": settings.length_window or 50,
                 "decision_swap_ratio": settings.decision_swap_ratio, "hint_ratio": settings.hint_ratio},
        "optim": {"lr": settings.stage2_lr, "epochs": settings.stage2_epochs, "warmup_steps": 20,
                  "batch_size": settings.batch_size // 2, "scheduler": "cosine"},
    })
    stage2_train = splits["train"]
    if settings.wording_drop > 0:
        rng, filler = random.Random(settings.seed + 3), filler_words(processor.tokenizer)
        stage2_train = [_varied(r, rng, settings, filler) for r in stage2_train]
    stage2 = run_stage(stage2_config, model=model, processor=processor,
                       train_records=stage2_train, val_records=splits["val"][:128], quiet=not show_progress)
    model = stage2.model.eval()

    banner("6/7 after: the safety-aligned model's answers")
    after_answers = generate_answers(
        lambda inputs: model.generate(**inputs, max_new_tokens=settings.max_new_tokens, do_sample=False),
        processor, test_subset, data_dir, settings, "generating (safe)", progress,
    )
    after = answer_metrics(test_subset, after_answers)
    examples = guarded_examples(model, processor, splits["test"], data_dir, settings)
    multi_turn = multi_turn_check(model, processor, splits["test"], data_dir, settings)

    banner("7/7 evaluation (safevlm eval: demo_heldout, FigStep + benign control) and report")
    from safevlm.eval.demo_section import run_demo_evaluation

    evaluation = run_demo_evaluation(model, processor, out, data_dir, settings, model_label=str(out / "base"),
                                     adapter_label=str(stage2.adapter_dir), show_progress=show_progress)

    report = {
        "settings": asdict(settings),
        "base": {"params": base_params, "vision_pretraining": vision_info, "multimodal_pretraining": lm_info},
        "safety_params": sum(p.numel() for p in model.safety_parameters()),
        "data": {s: len(r) for s, r in splits.items()},
        "stage1": {**stage1_metrics, "val": stage1.metrics, "adapter": str(stage1.adapter_dir)},
        "stage2": {"val": stage2.metrics, "adapter": str(stage2.adapter_dir)},
        "before": before,
        "after": after,
        "guarded_examples": examples,
        "multi_turn": multi_turn,
        "evaluation": evaluation,
        "samples": [
            {"id": r.id, "risk_type": model.config.taxonomy.type_name(r.risk_type), "risk_level": r.risk_level,
             "prompt": r.prompt, "before": b, "after": a}
            for r, b, a in list(zip(test_subset, before_answers, after_answers))[:12]
        ],
    }
    report["plots"] = _plots(out, report, type_true, type_pred, list(model.config.type_names))
    banner(None)
    report["steps"] = steps
    report["seconds"] = round(time.time() - start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report))
    return report


def guarded_examples(model, processor, records, image_root, settings: DemoSettings) -> list[dict]:
    """Answers under the default policy: the first held-out input for each action the policy
    takes (allow / hint / refuse), found with the guard alone, then generated with the guard."""
    from safevlm.data import open_image
    from safevlm.guarded import classify, generate_guarded

    candidates = records[: 4 * settings.batch_size]
    picks: dict[str, object] = {}
    for i in range(0, len(candidates), settings.batch_size):
        chunk = candidates[i:i + settings.batch_size]
        decisions = classify(model, processor, [open_image(r, image_root) for r in chunk], [r.prompt for r in chunk],
                             "default")
        for record, decision in zip(chunk, decisions):
            picks.setdefault(decision.action, record)
        if len(picks) == 3:
            break
    chosen = [picks[a] for a in ("allow", "hint", "refuse") if a in picks]
    results = generate_guarded(model, processor, [open_image(r, image_root) for r in chosen],
                               [r.prompt for r in chosen], "default", max_new_tokens=settings.max_new_tokens)
    return [{"prompt": r.prompt, "true_type": model.config.taxonomy.type_name(r.risk_type),
             "true_level": r.risk_level, **res.to_dict()} for r, res in zip(chosen, results)]


def multi_turn_check(model, processor, records, image_root, settings: DemoSettings) -> dict:
    """The default policy on every held-out request asked as the first turn, then as the second
    turn after a benign exchange (from the test split's templates), with the image in the first
    turn as ``safevlm chat`` puts it. Guard only: the LLM does not run, so the check takes
    seconds and reads the whole split, not ``eval_samples``: on a 200-item subset only ~27
    risky requests are refused as a first turn, and one miss moves the share by 4 points.

    ``risky_second_turn_refusal``: of the risky requests refused as a first turn, the share still
    refused as the second; ``benign_second_turn_allowed``: of the benign requests allowed as a
    first turn, the share still allowed as the second (None when there is none to count).
    """
    from safevlm.data import open_image
    from safevlm.data.synth import benign_opening
    from safevlm.guarded import classify

    rng = random.Random(settings.seed + 4)
    first, second = [], []
    for i in range(0, len(records), settings.batch_size):
        chunk = records[i:i + settings.batch_size]
        images = [open_image(r, image_root) for r in chunk]
        first += classify(model, processor, images, [r.prompt for r in chunk], "default")
        conversations = []
        for r in chunk:
            opening, answer, _ = benign_opening("test", rng)
            conversations.append([{"role": "user", "content": opening}, {"role": "assistant", "content": answer},
                                  {"role": "user", "content": r.prompt}])
        second += classify(model, processor, images, conversations, "default")
    refused = [k for k, r in enumerate(records) if r.risk_level > 0 and first[k].action == "refuse"]
    allowed = [k for k, r in enumerate(records) if r.risk_level == 0 and first[k].action == "allow"]

    def share(idx, action):
        return round(sum(second[k].action == action for k in idx) / len(idx), 4) if idx else None

    return {
        "risky_second_turn_refusal": share(refused, "refuse"),
        "benign_second_turn_allowed": share(allowed, "allow"),
        "n_risky_refused_first_turn": len(refused),
        "n_benign_allowed_first_turn": len(allowed),
    }


__all__ = ["DemoSettings", "answer_metrics", "run_demo"]
