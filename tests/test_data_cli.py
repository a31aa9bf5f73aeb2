"""`safevlm data check | render-figstep | synth` through the CLI entry point."""

from __future__ import annotations

import json

import pytest
from data_fixtures import SHARED_DATA, requires_shared_data, write_image

from safevlm.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def psavlm_file(tmp_path):
    write_image(tmp_path / "a.png")
    good = {
        "safe_type": 4,
        "safe_level": 2,
        "image": "a.png",
        "conversations": [{"from": "USER", "value": "<image>\nq"}],
    }
    lines = [json.dumps(good), "{broken", json.dumps(dict(good, image="gone.png"))]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "argv",
    [
        ["data", "--help"],
        ["data", "check", "--help"],
        ["data", "render-figstep", "--help"],
        ["data", "synth", "--help"],
    ],
)
def test_help(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: safevlm data" in capsys.readouterr().out


def test_data_without_action_prints_help(capsys):
    code, out, _ = run(capsys, "data")
    assert code == 2 and "check" in out and "synth" in out


def test_check_text(capsys, tmp_path):
    path = psavlm_file(tmp_path)
    code, out, _ = run(capsys, "data", "check", str(path))
    assert code == 0
    assert "total 3, loaded 1, skipped 2" in out
    assert f"{path}:2: malformed JSON" in out
    assert f"{path}:3: missing image file" in out and "gone.png" in out


def test_check_json_and_strict(capsys, tmp_path):
    path = psavlm_file(tmp_path)
    code, out, _ = run(capsys, "data", "check", str(path), "--json", "--strict")
    assert code == 1
    report = json.loads(out)
    assert {"total", "loaded", "skipped", "by_type", "by_level", "skipped_records"} <= set(report)
    assert (report["total"], report["loaded"], report["skipped"]) == (3, 1, 2)
    assert report["by_type"]["privacy"] == 1 and report["by_level"]["2"] == 1
    assert [s["location"] for s in report["skipped_records"]] == [f"{path}:2", f"{path}:3"]
    code, out, _ = run(capsys, "data", "check", str(path), "--json", "--skip-image-check", "--strict")
    assert code == 1 and json.loads(out)["skipped"] == 1  # the malformed line still counts
    (tmp_path / "clean.jsonl").write_text(path.read_text().splitlines()[0] + "\n")
    assert run(capsys, "data", "check", str(tmp_path / "clean.jsonl"), "--strict")[0] == 0


def test_check_errors_are_clear(capsys, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    code, _, err = run(capsys, "data", "check", str(tmp_path / "empty.jsonl"))
    assert code == 2 and "empty.jsonl: the file is empty" in err
    code, _, err = run(capsys, "data", "check", str(tmp_path / "nope.jsonl"))
    assert code == 2 and "no such data file" in err
    code, _, err = run(capsys, "data", "check", str(psavlm_file(tmp_path)), "--format", "xml")
    assert code == 2 and "unknown format 'xml'" in err


def test_check_images_option(capsys, tmp_path):
    path = psavlm_file(tmp_path)
    (tmp_path / "imgs").mkdir()
    code, out, _ = run(capsys, "data", "check", str(path), "--images", str(tmp_path / "imgs"), "--json")
    assert json.loads(out)["loaded"] == 0


@requires_shared_data
def test_check_real_vlguard_sample(capsys):
    code, out, _ = run(
        capsys, "data", "check", str(SHARED_DATA / "formats" / "vlguard_sample.json"), "--skip-image-check", "--json"
    )
    report = json.loads(out)
    assert code == 0 and report["format"] == "vlguard"
    assert (report["total"], report["loaded"], report["skipped"]) == (35, 35, 0)
    assert report["by_type"]["illegal"] == 2  # the two "sexually explicit" records


def test_render_figstep(capsys, tmp_path):
    csv = tmp_path / "b.csv"
    csv.write_text(
        "dataset,category_id,task_id,category_name,question,instruction\n"
        "ForbidQI,3,4,Malware Generation,Q?,Steps to test.\n"
    )
    code, out, _ = run(capsys, "data", "render-figstep", "--csv", str(csv), "--out", str(tmp_path / "imgs"))
    assert code == 0 and "wrote 1 FigStep image" in out
    assert (tmp_path / "imgs" / "query_ForbidQI_3_4_6.png").stat().st_size > 1000
    # the rendered folder is then an image root for `data check`
    code, out, _ = run(capsys, "data", "check", str(csv), "--images", str(tmp_path / "imgs"), "--json", "--strict")
    assert code == 0 and json.loads(out)["loaded"] == 1


def test_synth(capsys, tmp_path):
    code, out, _ = run(
        capsys,
        "data",
        "synth",
        "--out",
        str(tmp_path / "s"),
        "--n",
        "12",
        "--seed",
        "1",
        "--image-size",
        "64",
        "--clean-ratio",
        "0.5",
    )
    counts = json.loads(out)
    assert code == 0 and counts["total"] == 12 and counts["clean"] == 4
    assert sorted(p.name for p in (tmp_path / "s").glob("*.jsonl")) == ["test.jsonl", "train.jsonl", "val.jsonl"]
    code, out, _ = run(capsys, "data", "check", str(tmp_path / "s" / "train.jsonl"), "--json", "--strict")
    assert code == 0 and json.loads(out)["loaded"] == counts["splits"]["train"]
