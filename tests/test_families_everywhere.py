"""Everything that works for LLaVA works on every family (issue 11, item 4): the user-facing
paths that process images — `classify`, `chat`, `serve`, `scan`, `eval run` and training with
the vision-feature cache — carry each family's extra image inputs (``image_sizes``,
``image_grid_thw``...) and each image's own number of image tokens.

Parametrised over :data:`test_families.FAMILIES`, so a new family joins every test here. Each
test feeds images of *different* sizes (different tile grids) and checks the numbers against
the direct path: the family's own processor call on the same image and prompt, then
:meth:`SafeVLM.guard` / :meth:`SafeVLM.generate` (or the base's own ``generate``), or the
uncached training run. docs/families.md's second table is generated from :data:`VERIFIED`.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from docs_tables import check_generated_table
from test_families import FAMILIES, SMALL, _preset, _records, family, image, tiny_family  # noqa: F401  (fixtures)

from safevlm.cli import main
from safevlm.model import SafeVLM

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is shown in the image?"
NEW_TOKENS = 5


# ------------------------------------------------------------------------------------------ helpers
def _png(pil) -> bytes:
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def _write_images(folder: Path, family, seed: int = 0) -> list[Path]:
    """One PNG per size of the family (different tile grids), named in size order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(family.sizes):
        path = folder / f"img{i}.png"
        path.write_bytes(_png(image(size, seed + i)))
        paths.append(path)
    return paths


def _processor_inputs(processor, prompt: str, pil):
    """The family's own processor call for one image and prompt, chat-formatted (what a user of
    transformers writes)."""
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}], add_generation_prompt=True
    )
    return processor(images=[[pil]], text=[text], return_tensors="pt", padding=True)


def _open(path):
    from safevlm.data.images import decode_image

    return decode_image(path)


def _direct(model, processor, pil, prompt: str = PROMPT, new_tokens: int = 0) -> tuple[list[float], str | None]:
    """(level probabilities, greedy answer or None) on the direct path: the processor's own
    tensors, then ``SafeVLM.guard`` / ``SafeVLM.generate``."""
    inputs = _processor_inputs(processor, prompt, pil)
    with torch.inference_mode():
        probs = model.guard(**inputs).level_probs[0].tolist()
        if not new_tokens:
            return probs, None
        tokens = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=processor.tokenizer.pad_token_id)
    eos = model.base_model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    ids = tokens[0].tolist()
    cut = next((j for j, t in enumerate(ids) if t in eos), len(ids))
    return probs, processor.tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()


def _close(a, b, tol: float) -> None:
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= tol, (a, b)


@pytest.fixture
def deployed(tmp_path, tiny_family):
    """``{"family", "spec", "adapter", "policy", "model", "processor"}``: a saved adapter of fresh
    safety modules (seed 0, conditioned prefix tokens with random weights, so that they change
    the answer) bound to the family's tiny base, an allow-all policy YAML (every input reaches the
    LLM), and that adapter loaded on the shared tiny base for the direct path."""
    from safevlm.eval.generation import allow_all_policy

    family, base, processor = tiny_family
    torch.manual_seed(0)
    fresh = SafeVLM(base, num_prefix_tokens=3, **SMALL).eval()
    with torch.no_grad():
        fresh.prefix_tokens.condition.weight.normal_(std=0.5)
        fresh.prefix_tokens.embeddings.normal_(std=1.0)
    adapter = tmp_path / "adapter"
    fresh.save_pretrained(adapter)
    policy = tmp_path / "allow_all.yaml"
    policy.write_text(yaml.safe_dump(allow_all_policy(fresh.config.taxonomy).to_dict(), sort_keys=False))
    model = SafeVLM.from_pretrained(base, adapter)
    return {"family": family, "spec": f"tiny:{_preset(family)}", "adapter": str(adapter), "policy": str(policy),
            "model": model, "processor": processor}


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# ------------------------------------------------------------------------------------------ classify
def test_classify_command_equals_the_direct_guard(tmp_path, deployed, capsys):
    paths = _write_images(tmp_path / "images", deployed["family"])
    argv = ["classify", "--model", deployed["spec"], "--adapter", deployed["adapter"], "--prompt", PROMPT, "--json"]
    for path in paths:
        argv += ["--image", str(path)]
    assert main(argv) == 0  # one batch: images of every size in one vision pass
    rows = _json_lines(capsys.readouterr().out)
    assert [r["image"] for r in rows] == [str(p) for p in paths]
    for row, path in zip(rows, paths):
        expected, _ = _direct(deployed["model"], deployed["processor"], _open(path))
        _close(row["level_probs"], expected, 6e-5)  # printed with 4 digits
    # the image alone (no prompt): the head reads the image's own variable-length features
    assert main(["classify", "--model", deployed["spec"], "--adapter", deployed["adapter"], "--json",
                 "--image", str(paths[0]), "--image", str(paths[1])]) == 0
    rows = _json_lines(capsys.readouterr().out)
    model, processor = deployed["model"], deployed["processor"]
    for row, path in zip(rows, paths):
        inputs = model.backbone.image_inputs(processor, [_open(path)])
        with torch.inference_mode():
            _close(row["level_probs"], model.guard(None, **inputs.tensors).level_probs[0].tolist(), 6e-5)


# ------------------------------------------------------------------------------------------ chat
def test_chat_command_answers_as_the_direct_generate(tmp_path, deployed, capsys):
    path = _write_images(tmp_path / "images", deployed["family"])[0]
    assert main(["chat", "--model", deployed["spec"], "--adapter", deployed["adapter"], "--policy", deployed["policy"],
                 "--image", str(path), "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--json"]) == 0
    (row,) = _json_lines(capsys.readouterr().out)
    probs, text = _direct(deployed["model"], deployed["processor"], _open(path), new_tokens=NEW_TOKENS)
    assert row["action"] == "allow" and row["error"] is None
    assert text and row["text"] == text
    _close(row["level_probs"], probs, 6e-5)


# ------------------------------------------------------------------------------------------ serve
def test_server_chat_completion_equals_the_direct_generate(tmp_path, deployed):
    import httpx

    from safevlm.serve import Engine, ServerSettings, create_app, serve_in_thread

    model, processor = deployed["model"], deployed["processor"]
    engine = Engine(model, processor, deployed["policy"], max_batch_size=4, batch_wait_ms=50)
    settings = ServerSettings(served_model_name="tiny", max_tokens=16)
    paths = _write_images(tmp_path / "images", deployed["family"])[:2]
    try:
        with serve_in_thread(create_app(settings, engine), timeout=30) as url:
            for path in paths:
                url_data = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
                body = {"model": "tiny", "max_tokens": NEW_TOKENS, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url_data}}, {"type": "text", "text": PROMPT}]}]}
                reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
                assert reply.status_code == 200, reply.text
                answer = reply.json()
                probs, text = _direct(model, processor, _open(path), new_tokens=NEW_TOKENS)
                assert text and answer["choices"][0]["message"]["content"] == text
                assert answer["safety"]["action"] == "allow"
                _close(answer["safety"]["level_probs"], probs, 6e-5)
                # the prompt tokens count this image's own layout (tiles, newline tokens)
                inputs = _processor_inputs(processor, PROMPT, _open(path))
                assert answer["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1]
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------ scan
def test_scan_of_a_folder_equals_the_direct_guard(tmp_path, deployed, capsys):
    from safevlm.scan.attention import attention_maps, grid_of
    from safevlm.scan.pipeline import ItemBatches
    from safevlm.scan.sources import Item

    folder = tmp_path / "images"
    paths = _write_images(folder, deployed["family"])
    (folder / "img3.png").write_bytes(paths[0].read_bytes())  # a copy: reported as a duplicate
    out = tmp_path / "scan"
    assert main(["scan", "--model", deployed["spec"], "--adapter", deployed["adapter"], "--input", str(folder),
                 "--out", str(out), "--prompt", PROMPT, "--batch-size", "2", "--num-workers", "0", "--no-progress",
                 "--json"]) == 0
    capsys.readouterr()
    rows = {Path(r["source"]).name: r for r in map(json.loads, (out / "scan.jsonl").read_text().splitlines())}
    assert sorted(rows) == ["img0.png", "img1.png", "img2.png", "img3.png"]
    assert rows["img3.png"]["status"] == "duplicate" and rows["img3.png"]["level_probs"] == rows["img0.png"]["level_probs"]
    model, processor = deployed["model"], deployed["processor"]
    for path in paths:
        row = rows[path.name]
        assert row["status"] == "scanned" and row["error"] is None
        assert (row["height"], row["width"]) == _open(path).size[::-1]
        expected, _ = _direct(model, processor, _open(path))
        _close(row["level_probs"], expected, 2e-6)  # stored with 6 digits
    assert "data:image/png;base64" in (out / "report.html").read_text()  # attention overlays drawn
    # the report's attention map (mlp): each image's own rows x cols feature grid, summing to 1
    # (a fixed-grid family: the one square grid of every image)
    family = deployed["family"]
    skip, side = grid_of(model.config)
    assert (skip, side) == (0, 0) if family.variable else (skip == 0 and side ** 2 == model.config.num_image_features)
    loader = ItemBatches([], processor, model.backbone.fixed_image_tokens, PROMPT)
    shapes = []
    for k, path in enumerate(paths):
        images = []
        prep = loader.prepare(Item(k, str(k), "x", "x", "bytes", data=path.read_bytes()), images)
        (grid,) = attention_maps(model, processor, [prep], loader.finish([prep], images))
        with torch.inference_mode():
            vision = model.backbone.as_vision_features(
                model.encode_images(**model.backbone.image_inputs(processor, [_open(path)]).tensors))
        shapes.append(grid.shape)
        assert grid.shape == tuple(vision.grids[0, 1:].tolist()) and float(grid.sum()) == pytest.approx(1.0, abs=1e-5)
    assert len(set(shapes)) == (len(shapes) if family.variable else 1)


# ------------------------------------------------------------------------------------------ eval
def _eval_data(root: Path, family) -> Path:
    """The demo's synthetic held-out split, its images resized to the family's sizes."""
    from PIL import Image

    from safevlm.data.synth import make_synthetic_dataset

    data = root / "data"
    make_synthetic_dataset(data, 40, seed=0, image_size=32, multi_turn_ratio=0.0)
    for i, path in enumerate(sorted((data / "images").glob("*.png"))):
        h, w = family.sizes[i % len(family.sizes)]
        Image.open(path).convert("RGB").resize((w, h)).save(path)
    return data


def _batch_inputs(processor, prompts: list[str], images: list):
    """The family's own processor call for a batch of (image, prompt), chat-formatted, left-padded."""
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True)
        for p in prompts]
    processor.tokenizer.padding_side = "left"
    return processor(images=[[im] for im in images], text=texts, return_tensors="pt", padding=True)


def _decode(processor, tokens, eos) -> list[str]:
    out = []
    for row in tokens.tolist():
        cut = next((j for j, t in enumerate(row) if t in eos), len(row))
        out.append(processor.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return out


def test_eval_run_answers_equal_the_direct_paths(tmp_path, deployed, capsys):
    from safevlm.data import open_image
    from safevlm.eval.store import ResultsStore, RunKey
    from safevlm.eval.tasks import load_task

    data = _eval_data(tmp_path, deployed["family"])
    model, processor = deployed["model"], deployed["processor"]
    common = ["--task", "demo_heldout", "--data-root", str(data), "--limit", "4", "--max-new-tokens", str(NEW_TOKENS),
              "--batch-size", "4", "--judge", "rules", "--json"]
    stored = {}
    for system, extra in (("base", []), ("adapter", ["--adapter", deployed["adapter"]])):
        out = tmp_path / system
        assert main(["eval", "run", "--model", deployed["spec"], *extra, "--out", str(out), *common]) == 0
        payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert payload["tasks"]["demo_heldout"]["answered"] == 4
        with ResultsStore(out / "results.sqlite") as store:
            stored[system] = store.answers(RunKey(*payload["run"].values()), "demo_heldout")
    # the direct paths on the same batch (one call for the 4 items, as the run made it)
    ids = [item.id for item in load_task("demo_heldout").read(str(data)).items[:4]]
    assert sorted(ids) == sorted(stored["base"])
    answers = [stored["base"][i] for i in ids]
    images = [open_image(a.item.image, a.item.image_root) for a in answers]
    assert len({im.size for im in images}) > 1  # the batch mixes image sizes (tile grids)
    inputs = _batch_inputs(processor, [a.prompt for a in answers], images)
    pad = processor.tokenizer.pad_token_id
    eos = model.base_model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    with torch.inference_mode():
        # base: the base's own generate on the processor's own inputs
        base_tokens = model.base_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
        # adapter (every input allowed): SafeVLM.generate and the head
        safe_tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
        probs = model.guard(**inputs).level_probs.tolist()
    expected_base = _decode(processor, base_tokens[:, inputs["input_ids"].shape[1]:], eos)
    expected_safe = _decode(processor, safe_tokens, eos)
    assert any(expected_base) and any(expected_safe)  # real answers, not empty strings
    for k, item_id in enumerate(ids):
        base_answer, guarded = stored["base"][item_id], stored["adapter"][item_id]
        assert base_answer.error is None and base_answer.answer == expected_base[k]
        assert guarded.error is None and guarded.answer == expected_safe[k]
        _close(guarded.head["level_probs"], probs[k], 6e-5)


# ------------------------------------------------------------------------------------------ training
def test_cached_batches_equal_the_vision_pass_and_the_plain_collator(tmp_path, tiny_family):
    from safevlm.data import SafetyCollator
    from safevlm.train.cache import CachedFeatureCollator, FeatureCache, image_encoder, record_image_keys

    family, base, processor = tiny_family
    torch.manual_seed(0)
    model = SafeVLM(base, num_prefix_tokens=2, **SMALL).eval()
    records = _records(6, family.sizes, seed=3)
    keys = record_image_keys(records)
    cache = FeatureCache.for_model(tmp_path / "cache", model, processor.image_processor)
    if family.variable:
        assert cache.variable and cache.identity["format"] == 2 and cache.identity["family"] == family.name
    else:  # one (N, Dv) tensor per image, as LLaVA-1.5's
        assert not cache.variable and cache.identity["format"] == 1
    assert cache.fill(image_encoder(model, processor), [(keys[r.id], r) for r in records], batch_size=4, shard_size=4) == 6
    again = FeatureCache.for_model(tmp_path / "cache", model, processor.image_processor)  # read back from the shards
    assert len(again) == 6
    plain = SafetyCollator(processor, num_prefix_tokens=2)
    batch = plain(records)
    image_inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels", "prompt_mask",
                                                                "risk_level", "risk_type")}
    with torch.no_grad():
        direct = model.encode_images(**image_inputs)
    cached = again.get_batch([keys[r.id] for r in records])
    if family.variable:
        assert torch.equal(cached.lengths, direct.lengths) and torch.equal(cached.grids, direct.grids)
        assert len(set(direct.lengths.tolist())) > 1  # the records' images differ in size
        torch.testing.assert_close(cached.features, direct.features, atol=1e-6, rtol=0)
        for a, b in zip(cached.base_inputs, direct.base_inputs):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        assert cached.meta.keys() == direct.meta.keys()
        assert all(torch.equal(cached.meta[k], direct.meta[k]) for k in direct.meta)
    else:
        assert isinstance(cached, torch.Tensor) and cached.shape == direct.shape
        torch.testing.assert_close(cached, direct, atol=1e-6, rtol=0)
    # with the LLM (stage 2): every image its own tokens (variable families: read from the cache)
    full = CachedFeatureCollator(plain, again, keys, model.backbone.fixed_image_tokens)(records)
    assert "pixel_values" not in full
    for key in ("input_ids", "attention_mask", "labels", "prompt_mask", "risk_level", "risk_type"):
        assert torch.equal(full[key], batch[key]), key
    with torch.no_grad():
        a, b = model(**batch), model(**full)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.lm_loss, a.lm_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.type_logits, a.type_logits, atol=1e-5, rtol=1e-5)
    # what training computes: no logits, the LM head at the supervised tokens only, the same loss
    with torch.no_grad():
        t = model(**full, return_logits=False)
    assert t.logits is None and 0 < int((full["labels"] != -100).sum()) < full["labels"].numel() // 2
    torch.testing.assert_close(t.lm_loss, a.lm_loss, atol=1e-5, rtol=1e-5)
    # without the LLM (stage 1): one placeholder per image, the same head output
    short = CachedFeatureCollator(plain, again, keys, 1)(records)
    with torch.no_grad():
        c = model(**short, compute_lm=False)
    torch.testing.assert_close(c.type_logits, a.type_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.level_logits, a.level_logits, atol=1e-5, rtol=1e-5)


def test_stage1_with_the_feature_cache_equals_the_uncached_run(tmp_path, family):
    from train_fixtures import SAFETY_TEST_SIZES, tiny_config
    from transformers import TrainerCallback

    from safevlm.train import run_stage
    from safevlm.train.stage import build_model, load_base

    records = _records(24, family.sizes, seed=1)
    spec = f"tiny:{_preset(family)}"
    results, vision_calls, initial = {}, {}, None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for cached in (True, False):
            calls, training = [], {"on": False}

            class Watch(TrainerCallback):
                def on_train_begin(self, *args, model=None, **kwargs):
                    training["on"] = True
                    model.backbone.vision_tower.register_forward_pre_hook(
                        lambda *a: calls.append(1) if training["on"] else None)

            config = tiny_config(tmp_path / str(cached), cache={"enabled": cached}, optim={"epochs": 1},
                                 model={"base": spec, "safety": {**SAFETY_TEST_SIZES, "dropout": 0.0}},
                                 log={"save_steps": 0, "eval_steps": 0, "plot": False, "progress_bar": False})
            base, processor = load_base(config)
            model = build_model(config, base)
            initial = {k: v.clone() for k, v in model.safety_state_dict().items()}
            results[cached] = run_stage(config, model=model, processor=processor, train_records=records,
                                        callbacks=[Watch()])
            vision_calls[cached] = len(calls)
    finally:
        torch.set_num_threads(threads)
    assert results[True].cache["computed"] == len(records) and results[False].cache is None
    assert vision_calls[True] == 0 and vision_calls[False] > 0  # cached: the vision tower never ran in training
    a, b = (r.model.safety_state_dict() for r in (results[True], results[False]))
    moved = max((b[k] - initial[k]).abs().max().item() for k in b)
    # the same data order and updates; only float summation order differs (see test_train_stage)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < min(0.2 * 3e-3, moved / 10)


# ------------------------------------------------------------------------------------------ docs
VERIFIED = [  # (what, the test that shows it)
    ("`classify` (prompt / image alone) = direct guard, images of several sizes in one batch",
     "test_classify_command_equals_the_direct_guard"),
    ("`chat` (one turn) = direct `SafeVLM.generate` and guard", "test_chat_command_answers_as_the_direct_generate"),
    ("`serve`: a chat completion over HTTP = direct generate, guard and prompt tokens",
     "test_server_chat_completion_equals_the_direct_generate"),
    ("`scan` of a folder (batches, duplicates, report) = direct guard; attention map per size",
     "test_scan_of_a_folder_equals_the_direct_guard"),
    ("`eval run` (base, adapter) = the base's own generate / direct generate and guard",
     "test_eval_run_answers_equal_the_direct_paths"),
    ("feature cache: cached batches = the vision pass and the plain collator (with and without the LLM)",
     "test_cached_batches_equal_the_vision_pass_and_the_plain_collator"),
    ("stage 1 with the feature cache = the uncached run; no vision pass in training",
     "test_stage1_with_the_feature_cache_equals_the_uncached_run"),
]


def everywhere_table() -> str:
    """docs/families.md's second table: one column per family, one row per command / path."""
    import sys

    module = sys.modules[__name__]
    lines = ["| | " + " | ".join(f.name for f in FAMILIES) + " |", "|" + "---|" * (len(FAMILIES) + 1)]
    for what, test in VERIFIED:
        assert callable(getattr(module, test)), test
        lines.append(f"| {what} (`{test}`) | " + " | ".join("yes" for _ in FAMILIES) + " |")
    return "\n".join(lines) + "\n"


def test_docs_everywhere_table_is_current():
    check_generated_table(ROOT / "docs" / "families.md",
                          "<!-- everywhere table: generated by tests/test_families_everywhere.py -->\n",
                          "<!-- end of everywhere table -->", everywhere_table(),
                          "SAFEVLM_WRITE_DOCS=1 pytest tests/test_families_everywhere.py -k docs")
