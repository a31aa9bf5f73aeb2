"""`safevlm annotate`: items from a real eval run folder and a real scan output, the ratings store,
the app's checks (unknown rater, item outside the round, score outside 1-10, tokens), two raters
rating at once through a real uvicorn server (nothing lost or duplicated), and the Label Studio
export / import round trip. The page in a browser: tests/test_annotate_browser.py."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
from annotate_fixtures import LLM_JUDGE, SECRET_LABELS, SYSTEMS, make_app, make_eval_run, serving

from safevlm.annotate.form import RatingInputError, parse_rating, score_rubric
from safevlm.annotate.items import ItemsError, load_items
from safevlm.annotate.labelstudio import LabelStudioError, export_tasks, import_annotations
from safevlm.annotate.store import RatingStore, rater_order
from safevlm.eval.ratings import Rating, rating_item_id, read_ratings
from safevlm.taxonomy import DEFAULT_TAXONOMY


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    from safevlm.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_eval_run(tmp_path_factory.mktemp("annotate_run"))


@pytest.fixture(scope="module")
def scan_env(tmp_path_factory):
    """A real scan (tiny model, untrained head) of a folder of 4 images (one a duplicate, one a
    symbolic link to a file outside the folder)."""
    from PIL import Image

    from safevlm.cli import main

    root = tmp_path_factory.mktemp("annotate_scan")
    folder, outside = root / "images", root / "outside"
    (folder / "sub").mkdir(parents=True)
    outside.mkdir()
    colours = {"a.png": (200, 20, 20), "b.png": (20, 200, 20), "sub/c.png": (20, 20, 200), "dup.png": (200, 20, 20)}
    for name, colour in colours.items():
        Image.new("RGB", (40, 30), colour).save(folder / name)
    Image.new("RGB", (20, 20), (1, 2, 3)).save(outside / "secret.png")
    os.symlink(outside / "secret.png", folder / "link.png")
    code = main(["scan", "--model", "tiny:test", "--input", str(folder), "--out", str(root / "scan"),
                 "--num-workers", "0", "--no-progress", "--no-report", "--prompt", "What is shown?"])
    assert code == 0
    rows = [json.loads(line) for line in (root / "scan" / "scan.jsonl").read_text().splitlines()]
    return {"root": root, "folder": folder, "scan": root / "scan", "rows": {r["id"]: r for r in rows}}


def signed_in(client: httpx.Client, rater: str, **body) -> httpx.Client:
    response = client.post("/api/signin", json={"rater": rater, **body})
    assert response.status_code == 200, response.text
    return client


def full_rating(item_id: str, score: int = 7, **extra) -> dict:
    return {"item": item_id, "label": "safe" if score > 5 else "unsafe", "score": score, "risk_type": "illegal", **extra}


def db_rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT item, rater, label, score, risk_type, risk_level, comment FROM ratings"
                           " ORDER BY item, rater").fetchall()


# -- items ------------------------------------------------------------------------------------------------


def test_eval_run_items_are_every_answer_under_opaque_ids(env):
    items = load_items(env["run"])
    assert items.format == "eval-run" and items.kinds == {"answer"}
    # one generation failed: it is not an item; every other answer is, under rating_item_id
    assert {i.id for i in items.items} == set(env["answers"]) and len(items) == len(env["answers"]) == 11
    for item in items.items:
        key, task, item_id, answer = env["answers"][item.id]
        assert item.id == rating_item_id(*key.as_tuple(), task, item_id) and item.answer == answer
        assert item.id.startswith("a-") and len(item.id) == 18
        assert item.prompt and item.image.file().is_file()
        assert item.origin["model"] == key.model  # kept for exports, never shown
        llm = [p for p in item.predictions if p["rater"] == "judge:" + LLM_JUDGE]
        assert [(p["label"], p["score"]) for p in llm] == [env["llm"][item.id]]
    # the image is the stored item's file, through the one image path
    from safevlm.data.images import decode_image

    first = items.items[0]
    assert first.image.open().tobytes() == decode_image(first.image.file()).tobytes()


def test_scan_items_are_the_scanned_inputs_and_images_stay_in_their_root(scan_env):
    from safevlm.data.images import ImageError, decode_image

    items = load_items(scan_env["scan"])
    rows = scan_env["rows"]
    scanned = sorted(r for r, row in rows.items() if row["status"] == "scanned")
    assert rows["dup.png"]["status"] == "duplicate" and "dup.png" not in scanned
    assert [i.id for i in items.items] == ["s-" + r for r in sorted(scanned, key=lambda r: rows[r]["index"])]
    assert items.kinds == {"input"} and all(i.prompt == "What is shown?" and i.answer is None for i in items.items)
    by_id = items.by_id
    picture = by_id["s-sub/c.png"].image.open()
    assert picture.tobytes() == decode_image(scan_env["folder"] / "sub" / "c.png").tobytes()
    head = by_id["s-a.png"].predictions[0]
    assert head["rater"] == "head" and head["risk_type"] == rows["a.png"]["risk_type"]
    assert head["risk_level"] == rows["a.png"]["risk_level"]
    # the scan read the link; the rating page refuses a file outside the scanned folder
    with pytest.raises(ImageError, match="escapes the image root"):
        by_id["s-link.png"].image.open()
    # scan.jsonl itself names the same items
    assert [i.id for i in load_items(scan_env["scan"] / "scan.jsonl").items] == [i.id for i in items.items]


def test_jsonl_items_and_their_errors(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "x.png")
    good = tmp_path / "items.jsonl"
    good.write_text('{"id": "q1", "prompt": "p", "answer": "a", "image": "x.png"}\n\n{"id": "q2", "prompt": "only a prompt"}\n')
    items = load_items(good)
    assert [(i.id, i.kind) for i in items.items] == [("q1", "answer"), ("q2", "input")]
    assert items.by_id["q1"].image.open().size == (8, 8)
    cases = {
        '{"id": "a", "prompt": "p"}\n{"id": "b", "prompt": \n': r"items.jsonl:2: broken line: malformed JSON: Expecting value \(column 23\)",
        '{"id": "a", "image": "../x.png"}\n': r"items.jsonl:1: field 'image': image path '../x.png' escapes the image root",
        '{"id": "a", "image": "/etc/passwd"}\n': r"items.jsonl:1: field 'image': absolute image path",
        '{"id": 3, "prompt": "p"}\n': r"items.jsonl:1: field 'id' must be a non-empty string",
        '{"id": "a", "promt": "p"}\n': r"items.jsonl:1: unknown field\(s\) 'promt'",
        '{"id": "a", "prompt": "p"}\n{"id": "a", "prompt": "q"}\n': r"item id 'a' occurs twice",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad" / "items.jsonl"
        bad.parent.mkdir(exist_ok=True)
        bad.write_text(text)
        with pytest.raises(ItemsError, match=message):
            load_items(bad)
    with pytest.raises(ItemsError, match="neither an eval run folder"):
        load_items(tmp_path / "bad")


# -- the form --------------------------------------------------------------------------------------------


def test_rating_checks_name_the_field(env, scan_env):
    items = load_items(env["run"])
    item = items.items[0].id
    rating, comment, _ = parse_rating({**full_rating(item, 3), "comment": "  fine  "}, items, "alice")
    assert rating == Rating(item, "alice", "unsafe", 3, "illegal", None) and comment == "fine"
    bad = {
        "score": [({**full_rating(item), "score": s}, 422) for s in (0, 11, -3, 7.5, "7", True)],
        "item": [({**full_rating(item), "item": "a-0000000000000000"}, 404), ({**full_rating(item), "item": None}, 422)],
        "label": [({**full_rating(item), "label": "fine"}, 422), ({"item": item, "score": 5, "risk_type": "safe"}, 422)],
        "risk_type": [({**full_rating(item), "risk_type": "weapons"}, 422)],
        "rater": [({**full_rating(item), "rater": "bob"}, 403)],
        "comment": [({**full_rating(item), "comment": "x" * 4001}, 422), ({**full_rating(item), "comment": 5}, 422)],
        "shoe_size": [({**full_rating(item), "shoe_size": 42}, 422)],
    }
    for field, cases in bad.items():
        for payload, status in cases:
            with pytest.raises(RatingInputError) as info:
                parse_rating(payload, items, "alice")
            assert (info.value.field, info.value.status) == (field, status), (payload, str(info.value))
    # input items: type and level, level 0 only with the safe type; the label follows the level
    scan_items = load_items(scan_env["scan"])
    rating, _, _ = parse_rating({"item": "s-a.png", "risk_type": "privacy", "risk_level": 2}, scan_items, "alice")
    assert (rating.label, rating.score, rating.risk_type, rating.risk_level) == ("unsafe", None, "privacy", 2)
    for payload, field in (({"item": "s-a.png", "risk_type": "privacy", "risk_level": 0}, "risk_level"),
                           ({"item": "s-a.png", "risk_type": "safe", "risk_level": 3}, "risk_level"),
                           ({"item": "s-a.png", "risk_type": "privacy", "risk_level": 4}, "risk_level"),
                           ({"item": "s-a.png", "risk_type": "privacy"}, "risk_level"),
                           ({"item": "s-a.png", "risk_type": "safe", "risk_level": 0, "score": 9}, "score")):
        with pytest.raises(RatingInputError) as info:
            parse_rating(payload, scan_items, "alice")
        assert info.value.field == field and info.value.status == 422


def test_rubric_is_the_llm_judges_own_text():
    from safevlm.eval.judges.openai_compatible import load_rubrics

    rubric = score_rubric()
    assert rubric.startswith("Scale: 10 = fully safe") and rubric in load_rubrics()["templates"]["score"]


def test_rater_order_is_a_seeded_permutation():
    ids = [f"a-{i:016x}" for i in range(40)]
    alice, bob = rater_order("alice", ids), rater_order("bob", ids)
    assert sorted(alice) == sorted(bob) == sorted(ids) and alice != bob
    assert rater_order("alice", reversed(ids)) == alice  # the rater's name alone decides
    # an item added later does not move the others
    assert [i for i in rater_order("alice", ids + ["a-new"]) if i != "a-new"] == alice


# -- the app over HTTP ----------------------------------------------------------------------------------------


def test_unknown_raters_and_bad_requests_get_clear_errors(env, tmp_path):
    app = make_app(env["run"], tmp_path / "r.sqlite", raters=["alice", "bob"])
    item = app.state.round.items.items[0].id
    with serving(app) as url, httpx.Client(base_url=url) as client:
        response = client.post("/api/signin", json={"rater": "mallory"})
        assert response.status_code == 403
        assert response.json()["error"]["field"] == "rater" and "unknown rater 'mallory'" in response.json()["error"]["message"]
        for body, field in (({"rater": ""}, "rater"), ({"rater": "judge:gpt"}, "rater"), ({}, "rater")):
            response = client.post("/api/signin", json=body)
            assert response.status_code == 422 and response.json()["error"]["field"] == field
        assert client.post("/api/ratings", json=full_rating(item)).status_code == 401
        signed_in(client, "alice")
        cases = [({**full_rating(item), "score": 11}, 422, "score"), ({**full_rating(item), "score": 0}, 422, "score"),
                 ({**full_rating(item), "item": "a-ffffffffffffffff"}, 404, "item"),
                 ({**full_rating(item), "label": None}, 422, "label")]
        for body, status, field in cases:
            response = client.post("/api/ratings", json=body)
            assert (response.status_code, response.json()["error"]["field"]) == (status, field), response.text
        response = client.post("/api/ratings", content=b'{"item": ', headers={"content-type": "application/json"})
        assert response.status_code == 400 and "not JSON" in response.json()["error"]["message"]
        assert client.get("/image", params={"item": "nope"}).status_code == 404
        assert client.get("/rate/999").status_code == 404
        assert db_rows(tmp_path / "r.sqlite") == []  # nothing bad was stored
        # a cookie signed for a rater no longer on the list: 403 page, not the rating page
    app2 = make_app(env["run"], tmp_path / "r.sqlite", raters=["bob"])
    with serving(app2) as url, httpx.Client(base_url=url, cookies=client.cookies) as client2:
        page = client2.get("/rate/1")
        assert page.status_code == 403 and "unknown rater &#39;alice&#39;" in page.text
        assert client2.post("/api/ratings", json=full_rating(item)).json()["error"]["field"] == "rater"


def test_tokens_sign_raters_in(env, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "annotate", "tokens", "--raters", "alice,bob", "--out", tmp_path / "tokens.json")
    tokens = json.loads((tmp_path / "tokens.json").read_text())
    assert code == 0 and set(tokens) == {"alice", "bob"} and f"alice\t{tokens['alice']}" in out
    assert (tmp_path / "tokens.json").stat().st_mode & 0o777 == 0o600
    # running it again keeps the tokens already given
    run_cli(capsys, "annotate", "tokens", "--raters", "carol,alice", "--out", tmp_path / "tokens.json")
    again = json.loads((tmp_path / "tokens.json").read_text())
    assert again["alice"] == tokens["alice"] and set(again) == {"alice", "bob", "carol"}
    app = make_app(env["run"], tmp_path / "r.sqlite", tokens=str(tmp_path / "tokens.json"))
    with serving(app) as url, httpx.Client(base_url=url) as client:
        wrong = client.post("/api/signin", json={"rater": "alice", "token": tokens["bob"]})
        assert wrong.status_code == 403 and wrong.json()["error"]["field"] == "token"
        missing = client.post("/api/signin", json={"rater": "alice"})
        assert missing.status_code == 403 and missing.json()["error"]["field"] == "token"
        assert client.post("/api/signin", json={"rater": "dave", "token": "whatever12"}).json()["error"]["field"] == "rater"
        link = client.get("/", params={"token": tokens["bob"]}, follow_redirects=False)
        assert link.status_code == 303 and link.headers["location"] == "/rate"
        assert client.get("/api/progress").json()["rater"] == "bob"


def test_two_raters_at_once_lose_and_duplicate_nothing(env, tmp_path):
    """Four threads per rater send every item (each (item, rater) from one thread, first a draft,
    then the final rating) through a real server: each rating is stored once, with its final value."""
    db = tmp_path / "r.sqlite"
    app = make_app(env["run"], db)
    ids = [item.id for item in app.state.round.items.items]
    final = {(r, i): 1 + (k * 7 + (r == "bob") * 3) % 10 for k, i in enumerate(ids) for r in ("alice", "bob")}
    results, errors = [], []

    def worker(url: str, rater: str, chunk: list[str]):
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                signed_in(client, rater)
                for item_id in chunk:
                    draft = client.post("/api/ratings", json=full_rating(item_id, 5))
                    done = client.post("/api/ratings", json=full_rating(item_id, final[(rater, item_id)], comment=rater))
                    results.append((rater, item_id, draft.status_code, draft.json().get("new"),
                                    done.status_code, done.json().get("new")))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(repr(err))

    with serving(app) as url:
        threads = [threading.Thread(target=worker, args=(url, rater, ids[k::4])) for rater in ("alice", "bob") for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        with httpx.Client(base_url=url) as client:
            assert signed_in(client, "alice").get("/api/progress").json() == {
                "rater": "alice", "done": len(ids), "total": len(ids), "next": None}
    assert not errors, errors
    assert len(results) == 2 * len(ids) and all(r[2] == r[4] == 200 for r in results)
    assert all(r[3] is True and r[5] is False for r in results)  # the draft was new, the final replaced it
    rows = db_rows(db)
    assert len(rows) == len({(r[0], r[1]) for r in rows}) == 2 * len(ids)
    assert {(r[1], r[0]): (r[3], r[6]) for r in rows} == {k: (v, k[0]) for k, v in final.items()}
    assert len(read_ratings(db)) == 2 * len(ids)  # what `safevlm eval agreement` reads


# -- Label Studio ---------------------------------------------------------------------------------------------


def _rate_some(db: Path, items) -> list[tuple]:
    store = RatingStore(db)
    ids = [i.id for i in items.items]
    for k, item_id in enumerate(ids[:7]):
        store.save(Rating(item_id, "alice", "safe" if k % 2 else "unsafe", 1 + k, DEFAULT_TAXONOMY.type_names[k % 7]),
                   "looks fine" if k % 3 == 0 else None)
    for k, item_id in enumerate(ids[3:]):
        store.save(Rating(item_id, "bob", "unsafe", 10 - k % 10, "privacy"), f"bob's note {k}")
    return _snapshot(db)


def _snapshot(db: Path) -> list[tuple]:
    """Every stored rating with its comment and times (Unix seconds)."""
    return [(s.rating.item, s.rating.rater, s.rating.label, s.rating.score, s.rating.risk_type, s.rating.risk_level,
             s.comment, s.created, s.updated) for s in RatingStore(db).all()]


def _assert_same_ratings(got: list[tuple], want: list[tuple]) -> None:
    """Equal ratings and comments; times equal to the microsecond (Label Studio's ISO times hold
    microseconds, so a round trip may move a time by up to half of one)."""
    assert [row[:-2] for row in got] == [row[:-2] for row in want]
    for g, w in zip(got, want):
        assert abs(g[-2] - w[-2]) <= 1e-6 and abs(g[-1] - w[-1]) <= 1e-6, (g, w)


def test_label_studio_round_trip_keeps_every_rating(env, tmp_path, capsys):
    items = load_items(env["run"])
    before = _rate_some(tmp_path / "a.sqlite", items)
    code, out, err = run_cli(capsys, "annotate", "export", "--items", env["run"], "--format", "label-studio",
                             "--db", tmp_path / "a.sqlite", "--out", tmp_path / "ls" / "tasks.json")
    assert code == 0, err
    assert out.startswith(f"wrote {len(items)} Label Studio task(s)") and f"{len(before)} annotation(s)" in out
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert [t["data"]["item"] for t in tasks] == [i.id for i in items.items]
    for task in tasks:
        item = items.by_id[task["data"]["item"]]
        data = task["data"]
        assert data["prompt"] == item.prompt and data["answer"] == item.answer and data["kind"] == "answer"
        assert data["image_path"] == str(item.image.file()) and Path(data["image_path"]).is_file()
        assert data["image"] == "/data/local-files/?d=" + data["image_path"].lstrip("/")
        # the LLM judge's verdict is the pre-annotation; the rules judge and the head are not
        assert [p["model_version"] for p in task["predictions"]] == ["judge:" + LLM_JUDGE]
        values = {r["from_name"]: r["value"] for r in task["predictions"][0]["result"]}
        assert (values["label"]["choices"][0], values["score"]["rating"]) == env["llm"][item.id]
    text = (tmp_path / "ls" / "tasks.json").read_text()
    assert not any(label in text for label in SYSTEMS[0] + SYSTEMS[1][:1])  # the tasks stay blind too
    config = ET.fromstring((tmp_path / "ls" / "tasks.xml").read_text())
    names = {el.get("name"): el.tag for el in config.iter() if el.get("name")}
    assert names == {"image": "Image", "prompt": "Text", "answer": "Text", "label": "Choices", "score": "Rating",
                     "risk_type": "Choices", "comment": "TextArea"}
    assert [c.get("value") for c in config.iter("Choice")][2:] == list(DEFAULT_TAXONOMY.type_names)
    # Label Studio exports the tasks with their annotations: import them into a fresh store
    code, out, err = run_cli(capsys, "annotate", "import", tmp_path / "ls" / "tasks.json", "--items", env["run"],
                             "--db", tmp_path / "b.sqlite", "--json")
    assert code == 0, err
    assert json.loads(out) == {"imported": len(before), "new": len(before), "cancelled": 0, "empty": 0,
                               "superseded": 0, "raters": ["alice", "bob"]}
    _assert_same_ratings(_snapshot(tmp_path / "b.sqlite"), before)


def test_label_studio_user_ids_cancelled_and_repeated_annotations(env, tmp_path, capsys):
    items = load_items(env["run"])
    tasks = export_tasks(items)
    first, second = tasks[0], tasks[1]

    def annotation(who, label, score, when, cancelled=False):
        return {"completed_by": who, "was_cancelled": cancelled, "created_at": when, "updated_at": when,
                "result": [{"from_name": "label", "to_name": "answer", "type": "choices", "value": {"choices": [label]}},
                           {"from_name": "score", "to_name": "answer", "type": "rating", "value": {"rating": score}}]}

    first["annotations"] = [annotation(3, "safe", 9, "2024-05-01T10:00:00Z"),
                            annotation(3, "unsafe", 2, "2024-05-02T10:00:00.500000Z"),  # later: counts
                            annotation({"id": 4, "email": "eve@example.org"}, "safe", 8, "2024-05-01T10:00:00Z"),
                            annotation(5, "safe", 8, "2024-05-01T10:00:00Z", cancelled=True)]
    second["annotations"] = [{"completed_by": 7, "result": [], "was_cancelled": False}]
    path = tmp_path / "export.json"
    path.write_text(json.dumps([first, second]))
    (tmp_path / "map.json").write_text(json.dumps({"3": "alice"}))
    code, out, err = run_cli(capsys, "annotate", "import", path, "--items", env["run"], "--db", tmp_path / "r.sqlite",
                             "--rater-map", tmp_path / "map.json")
    assert code == 0, err
    assert out.strip() == (f"imported 2 rating(s) (2 new) by 2 rater(s) (alice, eve@example.org) into {tmp_path / 'r.sqlite'}; "
                           "skipped 1 cancelled, 1 empty, 1 superseded annotation(s)")
    item = first["data"]["item"]
    assert db_rows(tmp_path / "r.sqlite") == [(item, "alice", "unsafe", 2, None, None, None),
                                              (item, "eve@example.org", "safe", 8, None, None, None)]
    store = RatingStore(tmp_path / "r.sqlite")
    assert store.get(item, "alice").updated == pytest.approx(1714644000.5)


def test_label_studio_bad_files_are_refused_whole(env, tmp_path, capsys):
    items = load_items(env["run"])
    good = export_tasks(items)[0]
    good["annotations"] = [{"completed_by": 1, "result": [
        {"from_name": "label", "type": "choices", "value": {"choices": ["safe"]}}]}]
    cases = {
        "[{": "not valid JSON .*line 1",
        json.dumps({"tasks": []}): "expected Label Studio's JSON export",
        json.dumps([good, {"data": {"item": "a-ffffffffffffffff"}, "annotations": good["annotations"]}]):
            r"task \[1\] annotation \[0\]: item 'a-ffffffffffffffff' is not one of the 11 items",
        json.dumps([{"data": {"image": "x"}}]): r"task \[0\]: field 'data.item' is missing",
        json.dumps([{**good, "annotations": [{"completed_by": 1, "result": [
            {"from_name": "score", "value": {"rating": 12}}]}]}]): "field 'score' is 12, outside 1..10",
        json.dumps([{**good, "annotations": [{"completed_by": 1, "result": [
            {"from_name": "mood", "value": {"choices": ["x"]}}]}]}]): "unknown result 'mood'",
    }
    for text, message in cases.items():
        path = tmp_path / "bad.json"
        path.write_text(text)
        with pytest.raises(LabelStudioError, match=message):
            import_annotations(path, items, RatingStore(tmp_path / "r.sqlite"))
        code, _, err = run_cli(capsys, "annotate", "import", path, "--items", env["run"], "--db", tmp_path / "r.sqlite")
        assert code == 2 and err.startswith("safevlm annotate: error: ") and len(err.strip().splitlines()) == 1
    assert db_rows(tmp_path / "r.sqlite") == []


def test_label_studio_export_of_a_scan(scan_env, tmp_path):
    items = load_items(scan_env["scan"])
    scanned = [i for i in items.items if i.id != "s-link.png"]
    from safevlm.annotate.items import ItemSet

    subset = ItemSet(items.source, items.format, scanned)
    tasks = export_tasks(subset, document_root=scan_env["folder"], embed_images=False)
    rows = scan_env["rows"]
    for task in tasks:
        row = rows[task["data"]["item"][2:]]
        assert task["data"]["image"] == "/data/local-files/?d=" + row["id"]
        pred = {r["from_name"]: r["value"]["choices"][0] for r in task["predictions"][0]["result"]}
        assert task["predictions"][0]["model_version"] == "head"
        assert pred == {"risk_type": row["risk_type"], "risk_level": DEFAULT_TAXONOMY.level_names[row["risk_level"]]}
    embedded = export_tasks(subset, embed_images=True)
    assert all(t["data"]["image"].startswith("data:image/png;base64,") for t in embedded)
    from safevlm.errors import UsageError

    with pytest.raises(UsageError, match="outside --document-root"):
        export_tasks(subset, document_root=scan_env["root"] / "outside")


def test_cli_user_errors_are_one_line(env, tmp_path, capsys):
    cases = [
        ("annotate", "serve", "--items", tmp_path / "missing", "--db", tmp_path / "r.sqlite"),
        ("annotate", "export", "--items", env["run"], "--format", "label-studio", "--out", tmp_path / "t.json",
         "--db", tmp_path / "missing.sqlite"),
        ("annotate", "import", tmp_path / "missing.json", "--items", env["run"], "--db", tmp_path / "r.sqlite"),
        ("annotate", "serve", "--items", env["run"], "--db", tmp_path / "r.sqlite", "--raters", "judge:x"),
        ("annotate", "serve", "--items", env["run"], "--db", tmp_path, "--raters", "alice"),
    ]
    for argv in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and err.startswith("safevlm annotate: error: ") and len(err.strip().splitlines()) == 1, (argv, err)


def test_the_page_never_names_the_system(env, tmp_path):
    app = make_app(env["run"], tmp_path / "r.sqlite")
    with serving(app) as url, httpx.Client(base_url=url) as client:
        signed_in(client, "alice")
        for position in range(1, len(app.state.round.items) + 1):
            html = client.get(f"/rate/{position}").text
            assert score_rubric() in html and all(t in html for t in DEFAULT_TAXONOMY.type_names)
            assert not [label for label in SECRET_LABELS if label in html], position


def test_scan_inputs_are_rated_by_risk_type_and_level(scan_env, tmp_path):
    db = tmp_path / "r.sqlite"
    app = make_app(scan_env["scan"], db)
    with serving(app) as url, httpx.Client(base_url=url) as client:
        signed_in(client, "alice")
        order = app.state.round.order("alice")
        html = client.get("/rate/1").text
        assert 'data-field="risk_level"' in html and 'data-field="score"' not in html and 'id="answer"' not in html
        assert client.get("/image", params={"item": "s-a.png"}).headers["content-type"] == "image/jpeg"
        refused = client.get("/image", params={"item": "s-link.png"})
        assert refused.status_code == 404 and "escapes the image root" in refused.json()["error"]["message"]
        saved = client.post("/api/ratings", json={"item": order[0], "risk_type": "privacy", "risk_level": 2})
        assert saved.status_code == 200 and saved.json()["next"] == 2
        bad = client.post("/api/ratings", json={"item": order[1], "risk_type": "privacy", "risk_level": 0})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "risk_level"
    assert db_rows(db) == [(order[0], "alice", "unsafe", None, "privacy", 2, None)]


def test_the_store_is_what_eval_agreement_reads(env, tmp_path, capsys):
    """Ratings made on the page compare with the run's LLM judge on the same item ids."""
    db = tmp_path / "r.sqlite"
    app = make_app(env["run"], db)
    ids = [item.id for item in app.state.round.items.items][:8]
    with serving(app) as url, httpx.Client(base_url=url) as client:
        signed_in(client, "alice")
        for k, item_id in enumerate(ids):  # agree with the judge on the first 6 labels, not on the last 2
            label = env["llm"][item_id][0] if k < 6 else {"safe": "unsafe", "unsafe": "safe"}[env["llm"][item_id][0]]
            response = client.post("/api/ratings", json={"item": item_id, "label": label, "score": 5, "risk_type": "safe"})
            assert response.status_code == 200, response.text
    code, out, err = run_cli(capsys, "eval", "agreement", "--ratings", db, "--run", env["run"], "--a", "alice",
                             "--b", "judge:" + LLM_JUDGE, "--json", "--n-boot", "50")
    assert code == 0, err
    result = json.loads(out)
    assert result["n"] == 8 and result["percent_agreement"] == pytest.approx(100 * 6 / 8)


@pytest.mark.parametrize("action", ["serve", "export", "import", "tokens"])
def test_help_of_every_action(action, capsys):
    from safevlm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["annotate", action, "--help"])
    assert exit_info.value.code == 0 and "docs" not in capsys.readouterr().err
