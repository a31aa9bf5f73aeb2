"""What the commands print and write: --version, classify on folders and globs with --out,
chat --json with the same keys as classify --json, policy show / validate, tiny build --overwrite."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from conftest import make_image

from safevlm import __version__
from safevlm.cli import COMMAND_MODULES, build_parser, main

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- the words on the package are true -----------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"safevlm {__version__}\n"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"$', pyproject, re.M).group(1) == __version__


def test_help_and_description_name_only_commands_that_exist():
    description = build_parser().description
    listed = description.split(": ", 1)[1].rstrip(".").split(", ")
    assert listed and all(name in COMMAND_MODULES for name in listed), listed
    assert "scan" in description and "scan" in COMMAND_MODULES
    line = next(x for x in (REPO / "pyproject.toml").read_text().splitlines() if x.startswith("description"))
    assert "scan" in line


# -- classify and chat on a saved tiny model ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A saved tiny LLaVA (as `safevlm tiny build` writes it), an adapter and a folder of images."""
    from safevlm.model import SafeVLM
    from safevlm.tiny import save_tiny

    root = tmp_path_factory.mktemp("tiny")
    save_tiny(root / "model", preset="test", seed=0)
    model = SafeVLM.from_pretrained(str(root / "model"), num_prefix_tokens=4, num_query_tokens=4, head_num_heads=4)
    model.save_pretrained(root / "adapter")
    (root / "shots").mkdir()
    for i, name in enumerate(["c.png", "a.jpg", "b.png"]):
        make_image(i, size=40).save(root / "shots" / name)
    (root / "shots" / "readme.txt").write_text("not an image")
    return root


def test_classify_a_folder_and_a_glob_into_a_jsonl_file(tiny_folder, tmp_path, capsys):
    model = ["--model", tiny_folder / "model", "--adapter", tiny_folder / "adapter"]
    out = tmp_path / "results.jsonl"
    code, text, _ = run(capsys, "classify", *model, "--image", tiny_folder / "shots", "--image",
                        f"{tiny_folder}/shots/*.png", "--out", out, "--batch-size", "2", "--prompt", "What is it?")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    shots = tiny_folder / "shots"
    expected = [shots / "a.jpg", shots / "b.png", shots / "c.png", shots / "b.png", shots / "c.png"]
    assert code == 0 and [r["image"] for r in rows] == [str(p) for p in expected]
    assert all(r["policy"] == "default" and r["prompt"] == "What is it?" for r in rows)
    assert {"action", "risk_level", "risk_type", "level_probs", "type_probs"} <= set(rows[0])
    # the same image gives the same answer, in another batch too (batches of 2: b.png in the 1st and 3rd)
    assert rows[1]["level_probs"] == rows[3]["level_probs"] and rows[2]["type_probs"] == rows[4]["type_probs"]
    counts = {a: sum(r["action"] == a for r in rows) for a in ("allow", "hint", "refuse")}
    assert text == (f"classified 5 image(s) with policy default: allow {counts['allow']}, hint {counts['hint']}, "
                    f"refuse {counts['refuse']}; results in {out}\n")
    # --out is not replaced without --overwrite; with it, it is
    code, _, err = run(capsys, "classify", *model, "--image", shots / "a.jpg", "--out", out)
    assert code == 2 and "exists; choose another --out or pass --overwrite" in err and len(out.read_text().splitlines()) == 5
    code, _, _ = run(capsys, "classify", *model, "--image", shots / "a.jpg", "--out", out, "--overwrite")
    assert code == 0 and len(out.read_text().splitlines()) == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_chat_json_carries_image_prompt_and_policy_like_classify(tiny_folder, capsys, monkeypatch):
    image = tiny_folder / "shots" / "a.jpg"
    common = ["--model", tiny_folder / "model", "--adapter", tiny_folder / "adapter", "--json"]
    code, out, _ = run(capsys, "classify", *common, "--image", image, "--prompt", "What is it?")
    classify_row = json.loads(out)
    code, out, _ = run(capsys, "chat", *common, "--image", image, "--prompt", "What is it?", "--max-new-tokens", "2",
                       "--policy", "strict")
    chat_row = json.loads(out)
    assert code == 0
    assert (chat_row["image"], chat_row["prompt"], chat_row["policy"]) == (str(image), "What is it?", "strict")
    assert {"image", "prompt", "policy"} <= set(classify_row) and {"text", "completion_tokens"} <= set(chat_row)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"Hi\n/image {tiny_folder}/shots/b.png\nAnd now?\n"))
    code, out, _ = run(capsys, "chat", *common[:-1], "--json", "--max-new-tokens", "2")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert code == 0 and [(r["image"], r["prompt"], r["policy"]) for r in rows] == [
        (None, "Hi", "default"), (f"{tiny_folder}/shots/b.png", "And now?", "default")
    ]


# -- policy show / validate ------------------------------------------------------------------------------


def test_policy_show_and_validate(capsys, tmp_path):
    code, out, _ = run(capsys, "policy", "show", "strict")
    lines = out.splitlines()
    assert code == 0 and lines[0] == "policy strict (strict)"
    assert "requests may switch off: none" in out
    assert re.search(r"^  illegal\s+yes\s+p\(>= low\) >= 0\.3\s+p\(>= medium\) >= 0\.5$", out, re.M)
    code, out, _ = run(capsys, "policy", "show")  # the default policy: misleading content is never refused
    assert code == 0 and re.search(r"^  misleading\s+yes\s+p\(>= low\) >= 0\.5\s+never$", out, re.M)
    child = tmp_path / "child.yaml"
    child.write_text("version: 1\nextends: default\nname: child\nrules:\n  privacy: {enabled: false}\n")
    code, out, _ = run(capsys, "policy", "show", child, "--json")
    resolved = json.loads(out)
    assert code == 0 and resolved["name"] == "child" and resolved["rules"]["privacy"]["enabled"] is False
    assert resolved["rules"]["default"]["refuse_level"] == 3  # inherited from default
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  default: {refuse_level: 0}\n")
    code, out, err = run(capsys, "policy", "validate", child, bad, "strict")
    assert code == 1
    assert out.splitlines() == [f"{child}: ok (policy child)", "strict: ok (policy strict)"]
    assert err.splitlines() == [
        f"invalid: {bad}: rules.default: refuse_level must be a risk level 1..3 (low, medium, high), got 0"
    ]
    code, _, _ = run(capsys, "policy", "validate", child)
    assert code == 0


# -- tiny build: an existing folder is replaced only with --overwrite -------------------------------


def test_tiny_build_overwrite_replaces_the_whole_folder(tmp_path, capsys):
    out = tmp_path / "tiny"
    out.mkdir()  # an empty folder is fine
    code, text, _ = run(capsys, "tiny", "build", "--out", out, "--preset", "test")
    assert code == 0 and text == f"saved tiny LLaVA (test, seed 0) to {out}\n"
    (out / "stale.txt").write_text("from before")
    code, _, err = run(capsys, "tiny", "build", "--out", out, "--preset", "test", "--seed", "1")
    assert code == 2 and "exists and is not empty" in err and (out / "stale.txt").exists()
    code, _, _ = run(capsys, "tiny", "build", "--out", out, "--preset", "test", "--seed", "1", "--overwrite")
    assert code == 0 and not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no staging or trash left behind
