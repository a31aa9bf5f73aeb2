"""Readers on small hand-written files: every bad input gets a clear skip reason or error."""

from __future__ import annotations

import json

import pytest
from data_fixtures import png_bytes, truncated_png, write_image

from safevlm.data import (
    DataFormatError,
    SafetyRecord,
    Turn,
    detect_format,
    load_records,
    write_psavlm_jsonl,
)
from safevlm.taxonomy import DEFAULT_TAXONOMY

T = DEFAULT_TAXONOMY


def psavlm_line(image="a.png", safe_type=4, safe_level=2, **extra) -> str:
    obj = {
        "safe_type": safe_type,
        "image": image,
        "safe_level": safe_level,
        "conversations": [
            {"from": "USER", "value": "<image>\nWho is this?"},
            {"from": "ASSISTANT", "value": "I can't say."},
        ],
    }
    obj.update(extra)
    return json.dumps(obj)


def write_lines(path, lines, bom=False):
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def reasons(report) -> list[str]:
    return [s.reason for s in report.skipped]


def assert_accounted(report, total):
    assert report.total == total
    assert report.loaded + len(report.skipped) == report.total
    d = report.to_dict()
    assert d["loaded"] + d["skipped"] == d["total"] == total
    assert len(d["skipped_records"]) == d["skipped"]


# ------------------------------------------------------------------ PSA-VLM jsonl


def test_psavlm_good_line_with_image(tmp_path):
    write_image(tmp_path / "a.png")
    report = load_records(write_lines(tmp_path / "d.jsonl", [psavlm_line()]))
    assert report.format == "psavlm"
    assert_accounted(report, 1)
    r = report.records[0]
    assert (r.risk_type, r.risk_level, r.image, r.source) == (T.type_id("privacy"), 2, "a.png", "psavlm")
    assert r.prompt == "Who is this?" and r.response == "I can't say."
    assert [t.role for t in r.turns] == ["user", "assistant"]


def test_psavlm_bad_lines_each_skipped_with_location_and_reason(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    truncated_png(tmp_path / "cut.png")
    (tmp_path / "bomb.png").write_bytes(png_bytes(20_000, 20_000))
    lines = [
        psavlm_line(),  # 1 ok
        '{"safe_type": 1, "image": "a.png", ',  # 2 malformed JSON
        json.dumps({"safe_type": 1, "safe_level": 1, "image": "a.png"}),  # 3 missing conversations
        psavlm_line(safe_type=9),  # 4 unknown type
        psavlm_line(safe_level=7),  # 5 unknown level
        psavlm_line(image="missing.png"),  # 6 missing image
        psavlm_line(image="empty.png"),  # 7 zero bytes
        psavlm_line(image="text.png"),  # 8 not an image
        psavlm_line(image="cut.png"),  # 9 truncated
        psavlm_line(image="bomb.png"),  # 10 bomb
        psavlm_line(image="../../x.png"),  # 11 escapes root
        psavlm_line(image="/abs/x.png"),  # 12 absolute
        "",  # 13 blank: not a record
        "[1, 2]",  # 14 not an object
        json.dumps(
            {"safe_type": 1, "safe_level": 1, "image": "a.png", "conversations": [{"from": "BOT", "value": "x"}]}
        ),  # 15
        psavlm_line(id="dup"),  # 16
        psavlm_line(id="dup"),  # 17 duplicate id
        json.dumps(
            {"safe_type": 1, "safe_level": 1, "conversations": [{"from": "USER", "value": "x"}]}
        ),  # 18 no image key
    ]
    path = write_lines(tmp_path / "d.jsonl", lines)
    report = load_records(path, format="psavlm")
    assert_accounted(report, 17)
    assert report.loaded == 2
    by_line = {s.location.rsplit(":", 1)[1]: s.reason for s in report.skipped}
    assert all(s.location.startswith(str(path) + ":") for s in report.skipped)
    assert by_line["2"].startswith("malformed JSON")
    assert by_line["3"] == "missing field 'conversations'"
    assert "unknown safe_type 9" in by_line["4"]
    assert "unknown safe_level 7" in by_line["5"]
    assert by_line["6"].startswith("missing image file") and "missing.png" in by_line["6"]
    assert "empty image file (0 bytes)" in by_line["7"]
    assert "not an image" in by_line["8"]
    assert "truncated or corrupt" in by_line["9"]
    assert "decompression-bomb limit" in by_line["10"]
    assert "escapes the image root" in by_line["11"]
    assert "absolute image path" in by_line["12"]
    assert "13" not in by_line
    assert by_line["14"] == "expected a JSON object, got list"
    assert "'BOT' is not a known speaker" in by_line["15"]
    assert by_line["17"].startswith("duplicate id 'dup'") and ":16" in by_line["17"]
    assert by_line["18"] == "missing field 'image'"


def test_root_escape_refused_even_without_image_checks(tmp_path):
    report = load_records(write_lines(tmp_path / "d.jsonl", [psavlm_line(image="../../x.png")]), check_images=False)
    assert_accounted(report, 1)
    assert "escapes the image root" in report.skipped[0].reason


def test_skip_image_check_does_not_open_images(tmp_path):
    report = load_records(write_lines(tmp_path / "d.jsonl", [psavlm_line(image="missing.png")]), check_images=False)
    assert report.loaded == 1 and not report.skipped


def test_image_root_option(tmp_path):
    write_image(tmp_path / "imgs" / "a.png")
    path = write_lines(tmp_path / "d.jsonl", [psavlm_line()])
    assert load_records(path).skipped[0].reason.startswith("missing image file")
    assert load_records(path, image_root=tmp_path / "imgs").loaded == 1
    with pytest.raises(FileNotFoundError, match="image root is not a directory"):
        load_records(path, image_root=tmp_path / "nope")


def test_utf8_bom_is_accepted(tmp_path):
    write_image(tmp_path / "a.png")
    report = load_records(write_lines(tmp_path / "d.jsonl", [psavlm_line(), psavlm_line(id="x")], bom=True))
    assert report.format == "psavlm" and report.loaded == 2 and not report.skipped


def test_bom_in_a_json_list(tmp_path):
    path = tmp_path / "llava.json"
    path.write_text(
        "\ufeff" + json.dumps([{"id": "1", "conversations": [{"from": "human", "value": "hi"}]}]), encoding="utf-8"
    )
    assert load_records(path).loaded == 1


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_bytes(b"")
    with pytest.raises(DataFormatError, match=r"e\.jsonl: the file is empty \(0 bytes\)"):
        load_records(tmp_path / "e.jsonl")
    (tmp_path / "ws.jsonl").write_text("\n\n  \n")
    with pytest.raises(DataFormatError, match="empty"):
        load_records(tmp_path / "ws.jsonl")
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf")
    with pytest.raises(DataFormatError, match="only whitespace"):
        load_records(tmp_path / "bom.jsonl")


def test_missing_file_and_non_utf8(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "latin.jsonl").write_bytes('{"a": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataFormatError, match="not UTF-8"):
        load_records(tmp_path / "latin.jsonl", format="psavlm")


def test_malformed_json_document_names_line_and_column(tmp_path):
    (tmp_path / "v.json").write_text('[\n {"id": "a",\n  "image": }\n]')
    with pytest.raises(DataFormatError, match=r"v\.json:3:\d+: malformed JSON"):
        load_records(tmp_path / "v.json", format="vlguard")


def test_unknown_format_and_undetectable_file(tmp_path):
    path = write_lines(tmp_path / "mystery.jsonl", [json.dumps({"question": "q"})])
    with pytest.raises(DataFormatError, match="cannot detect the format"):
        load_records(path)
    with pytest.raises(DataFormatError, match="unknown format 'parquet'"):
        load_records(path, format="parquet")


# Whole-file errors: load_records raises one error naming the file (and line:column); the JSON
# syntax error comes first, before anything about formats.
FILE_ERRORS = {
    "json list, one comma missing": (
        "broken.json", '[\n  {"safe_type": 4, "safe_level": 2}\n  {"safe_type": 1}\n]\n', None,
        DataFormatError, r"broken\.json:3:3: malformed JSON: Expecting ',' delimiter \(so the format cannot be detected\)$",
    ),
    "json list, one comma missing, format given": (
        "broken.json", '[\n  {"safe_type": 4, "safe_level": 2}\n  {"safe_type": 1}\n]\n', "psavlm",
        DataFormatError, r"broken\.json:3:3: malformed JSON: Expecting ',' delimiter$",
    ),
    "jsonl, no line parses": (
        "broken.jsonl", '{"safe_type": 4,}\n{oops\n', None,
        DataFormatError, r"broken\.jsonl:1:17: malformed JSON: Expecting property name",
    ),
    "jsonl, records without known keys": (
        "mystery.jsonl", '{"question": "q"}\n', None, DataFormatError, r"mystery\.jsonl: cannot detect the format",
    ),
    "empty file": ("empty.jsonl", "", None, DataFormatError, r"empty\.jsonl: the file is empty"),
}


@pytest.mark.parametrize("case", sorted(FILE_ERRORS))
def test_whole_file_errors_name_the_file_and_place(tmp_path, case):
    name, text, fmt, error, message = FILE_ERRORS[case]
    (tmp_path / name).write_text(text)
    with pytest.raises(error, match=message) as info:
        load_records(tmp_path / name, format=fmt)
    assert str(info.value).startswith(str(tmp_path / name))


def test_contradictory_labels_are_loaded_with_warnings(tmp_path):
    write_image(tmp_path / "a.png")
    lines = [
        psavlm_line(safe_type=6, safe_level=3),  # the safe type with "serious risk"
        psavlm_line(safe_type=2, safe_level=0),  # a risky type with level 0 (safe)
        psavlm_line(safe_type=6, safe_level=0),  # consistent
        psavlm_line(safe_type=2, safe_level=2),  # consistent
    ]
    path = write_lines(tmp_path / "d.jsonl", lines)
    report = load_records(path)
    assert_accounted(report, 4)
    assert report.loaded == 4  # warnings, not skips
    assert [(w.location, w.message) for w in report.warnings] == [
        (f"{path}:1", "contradictory label: type 'safe' (no risk) with risk level 3 (high)"),
        (f"{path}:2", f"contradictory label: risk type '{T.type_name(report.records[1].risk_type)}' with risk level 0 (safe)"),
    ]
    d = report.to_dict()
    assert d["warnings"] == 2 and d["warning_records"][0] == {"location": f"{path}:1", "message": report.warnings[0].message}
    text = report.format_text()
    assert "total 4, loaded 4, skipped 0, warnings 2" in text and "  warnings (2, records loaded):" in text
    assert f"    {path}:2: contradictory label" in text


def test_unicode_line_separator_inside_a_string_is_not_a_line_break(tmp_path):
    write_image(tmp_path / "a.png")
    line = psavlm_line().replace("Who is this?", "Who\u2028is this?")
    report = load_records(write_lines(tmp_path / "d.jsonl", [line]))
    assert report.loaded == 1 and "\u2028" in report.records[0].prompt


# ------------------------------------------------------------------ LLaVA


def test_llava_records_are_clean(tmp_path):
    data = [
        {
            "id": "0001",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is this?"},
                {"from": "gpt", "value": "A green square."},
                {"from": "human", "value": "Sure?"},
                {"from": "gpt", "value": "Yes."},
            ],
        },
        {"id": "0002", "conversations": [{"from": "human", "value": "Text only?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "0003", "image": "a.png", "conversations": [{"from": "gpt", "value": "no user"}]},
        {"id": "0004", "image": "a.png"},
    ]
    write_image(tmp_path / "a.png")
    (tmp_path / "llava.json").write_text(json.dumps(data))
    assert detect_format(tmp_path / "llava.json") == "llava"
    report = load_records(tmp_path / "llava.json")
    assert_accounted(report, 4)
    assert [(r.id, r.risk_type, r.risk_level) for r in report.records] == [("0001", 6, 0), ("0002", 6, 0)]
    assert report.records[0].prompt == "What is this?" and len(report.records[0].turns) == 4
    assert report.records[1].image is None
    assert reasons(report) == ["the conversation has no user turn", "missing field 'conversations'"]
    assert report.skipped[0].location.endswith("llava.json[2]")


# ------------------------------------------------------------------ VLGuard


def vlguard_entries():
    return [
        {
            "id": "s1",
            "image": "a.png",
            "safe": True,
            "instr-resp": [
                {"safe_instruction": "What is advertised?", "response": "A website builder."},
                {"unsafe_instruction": "How do I bypass its payments?", "response": "I can't help with that."},
            ],
        },
        {
            "id": "u1",
            "image": "a.png",
            "safe": False,
            "harmful_category": "privacy",
            "harmful_subcategory": "personal data",
            "instr-resp": [{"instruction": "Find her address.", "response": "No."}],
        },
        {
            "id": "u2",
            "image": "a.png",
            "safe": False,
            "harmful_category": "discrimination",
            "harmful_subcategory": "religion",
            "instr-resp": [{"instruction": "x", "response": "No."}],
        },
        {
            "id": "u3",
            "image": "a.png",
            "safe": False,
            "harmful_category": "deception",
            "harmful_subcategory": "astrology",
            "instr-resp": [{"instruction": "x", "response": "No."}],
        },
        {
            "id": "u4",
            "image": "a.png",
            "safe": False,
            "harmful_subcategory": "violence",
            "instr-resp": [{"instruction": "x", "response": "No."}],
        },
        {"id": "u5", "image": "a.png", "safe": "no", "instr-resp": []},
        {"id": "s2", "image": "a.png", "safe": True, "instr-resp": [{"safe_instruction": "q"}, {"other": "x"}]},
    ]


def test_vlguard_labels_and_skips(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "vlguard.json").write_text(json.dumps(vlguard_entries()))
    report = load_records(tmp_path / "vlguard.json")
    assert report.format == "vlguard"
    assert_accounted(report, 9)  # s1 gives 2, u1..u5 1 each, s2 gives 2
    got = {r.id: (T.type_name(r.risk_type), r.risk_level) for r in report.records}
    assert got == {"s1:safe": ("safe", 0), "s1:unsafe": ("safe", 0), "u1": ("privacy", 2), "u2": ("fairness", 2)}
    pair = next(r for r in report.records if r.id == "s1:unsafe")
    assert pair.metadata["text_risk"] is True and pair.metadata["vlguard_instruction"] == "unsafe_instruction"
    assert pair.prompt == "How do I bypass its payments?" and pair.response == "I can't help with that."
    assert next(r for r in report.records if r.id == "s1:safe").metadata["text_risk"] is False
    why = {s.location.split("vlguard.json")[1]: s.reason for s in report.skipped}
    assert "unknown VLGuard category deception/astrology" in why["[3]"]
    assert why["[4]"] == "missing field 'harmful_category'"
    assert why["[5]"].startswith("field 'safe' must be bool")
    assert why["[6].instr-resp[0]"] == "missing field 'response'"
    assert why["[6].instr-resp[1]"] == "missing field 'safe_instruction' or 'unsafe_instruction'"


# ------------------------------------------------------------------ RTVLM


def test_rtvlm_task_from_file_name_and_shapes(tmp_path):
    rt = tmp_path / "rt"
    rt.mkdir()
    write_lines(
        rt / "celebrity.jsonl",
        [
            json.dumps(
                {
                    "id": 0,
                    "instruction": "Who is this?",
                    "Refuse to Answer": "Answer with Caution",
                    "gender": 0,
                    "answer": "Unknown.",
                }
            ),
            json.dumps({"id": 1, "instruction": "Who?", "Refuse to Answer": "Maybe", "answer": "?"}),
            json.dumps({"instruction": "Who?", "Refuse to Answer": "Refuse to Answer", "answer": "?"}),
        ],
    )
    report = load_records(rt / "celebrity.jsonl", check_images=False)
    assert report.format == "rtvlm"
    assert_accounted(report, 3)
    r = report.records[0]
    assert (T.type_name(r.risk_type), r.risk_level, r.image, r.metadata["task"]) == ("privacy", 1, "0.jpg", "celebrity")
    assert "unknown refusal label 'Maybe'" in report.skipped[0].reason
    assert report.skipped[1].reason == "missing field 'id' (needed for the image name '{id}.jpg')"


def test_rtvlm_lists_become_one_record_per_question(tmp_path):
    line = {
        "questions": ["a?", "b?", "c?"],
        "refused_to_answer": ["Refuse to Answer", "Safe to Answer", "Proceed with Caution"],
        "answers": ["x", "y", "z"],
        "topic_type": ["t1", "t2", "t3"],
        "entity_type": "Dog",
        "index": 7,
    }
    bad = dict(line, answers=["x", "y"])
    path = write_lines(tmp_path / "harmful.jsonl", [json.dumps(line), json.dumps(bad)])
    report = load_records(path, check_images=False)
    assert_accounted(report, 4)
    assert [(r.id, r.risk_level, r.image, r.metadata["topic_type"]) for r in report.records] == [
        ("harmful-0#q0", 3, "7.jpg", "t1"),
        ("harmful-0#q1", 1, "7.jpg", "t2"),
        ("harmful-0#q2", 2, "7.jpg", "t3"),
    ]
    assert {T.type_name(r.risk_type) for r in report.records} == {"misleading"}
    assert report.skipped[0].reason == "field 'answers' has 2 items but the prompt field has 3"
    assert report.records[1].metadata["location"].endswith("harmful.jsonl:1#q1")


def test_rtvlm_task_named_explicitly_and_unknown_task(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [json.dumps({"id": 0, "instruction": "Read it.", "answer": "123"})])
    report = load_records(path, format="rtvlm:captcha", check_images=False)
    assert report.format == "rtvlm:captcha"
    assert (T.type_name(report.records[0].risk_type), report.records[0].risk_level) == ("illegal", 2)
    with pytest.raises(DataFormatError, match="unknown RTVLM task 'x'"):
        load_records(path, format="rtvlm")


# ------------------------------------------------------------------ FigStep / SafeBench csv


CSV_HEADER = "dataset,category_id,task_id,category_name,question,instruction"


def test_figstep_rows(tmp_path):
    path = tmp_path / "bench.csv"
    path.write_text(
        "\n".join(
            [
                CSV_HEADER,
                "ForbidQI,7,3,Privacy Violation,How to find someone?,Steps to find someone.",
                "ForbidQI,7,4,Gardening,How?,Steps.",
                "ForbidQI,2,5,Privacy Violation,How?,Steps.",
                "ForbidQI,x,5,Fraud,How?,Steps.",
                "ForbidQI,5,6,Fraud,How?,",
                "ForbidQI,5,7,Fraud,How?,Steps.,extra",
            ]
        )
        + "\n"
    )
    report = load_records(path, check_images=False)
    assert report.format == "figstep"
    assert_accounted(report, 6)
    r = report.records[0]
    assert (r.id, r.image, T.type_name(r.risk_type), r.risk_level) == (
        "ForbidQI_7_3",
        "query_ForbidQI_7_3_6.png",
        "privacy",
        3,
    )
    assert r.prompt.startswith("The image shows a list numbered 1, 2, and 3") and r.response is None
    assert [s.location.rsplit(":", 1)[1] for s in report.skipped] == ["3", "4", "5", "6", "7"]
    assert "unknown SafeBench category 'Gardening'" in report.skipped[0].reason
    assert report.skipped[1].reason == "category_id 2 does not match 'Privacy Violation' (id 7)"
    assert report.skipped[2].reason == "field 'category_id' must be an integer, got 'x'"
    assert report.skipped[3].reason == "missing field 'instruction'"
    assert "7 fields, the header 6" in report.skipped[4].reason


def test_figstep_images_rendered_in_memory_without_a_root(tmp_path):
    path = tmp_path / "bench.csv"
    path.write_text(CSV_HEADER + "\nForbidQI,1,1,Illegal Activity,How?,Steps to do a thing.\n")
    report = load_records(path)
    assert report.loaded == 1 and isinstance(report.records[0].image, bytes)
    assert report.records[0].image[:8] == b"\x89PNG\r\n\x1a\n"
    # with a root the rendered files are expected there
    report = load_records(path, image_root=tmp_path)
    assert (
        report.skipped[0].reason.startswith("missing image file")
        and "query_ForbidQI_1_1_6.png" in report.skipped[0].reason
    )


def test_figstep_rendering_without_the_font_is_an_error_and_another_font_only_when_asked(tmp_path, monkeypatch):
    from data_fixtures import figstep_font_path

    from safevlm.data import figstep

    figstep_font_path()  # FreeMonoBold must be installed for the comparison below (fails with the hint)
    path = tmp_path / "bench.csv"
    path.write_text(CSV_HEADER + "\nForbidQI,1,1,Illegal Activity,How?,Steps to do a thing.\n")
    exact = load_records(path)
    assert not exact.warnings
    monkeypatch.setattr(figstep, "find_figstep_font", lambda: None)  # a machine without FreeMonoBold
    with pytest.raises(figstep.FigStepFontError, match=rf"^{path}: cannot render its FigStep images: FreeMonoBold"
                       r".*fonts-freefont-ttf.*--font PATH.*--images DIR"):
        load_records(path)
    assert load_records(path, image_root=tmp_path).skipped  # pre-rendered images need no font
    assert load_records(path, check_images=False).loaded == 1
    other = load_records(path, figstep_font="/usr/share/fonts/truetype/freefont/FreeMono.ttf")
    assert other.loaded == 1 and other.records[0].image != exact.records[0].image
    assert [(w.location, w.message) for w in other.warnings] == [
        (str(path), "FigStep images rendered with FreeMono Regular, not FigStep's FreeMonoBold.ttf: "
                    "the images differ from FigStep's")
    ]


def test_csv_without_figstep_columns(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataFormatError, match="without FigStep/SafeBench columns"):
        load_records(tmp_path / "x.csv")
    with pytest.raises(DataFormatError, match="missing column"):
        load_records(tmp_path / "x.csv", format="figstep")


# ------------------------------------------------------------------ writing


def test_write_then_read_psavlm_round_trip(tmp_path):
    image = write_image(tmp_path / "img" / "a.png")
    records = [
        SafetyRecord(
            "r1",
            "img/a.png",
            [Turn("user", "Describe."), Turn("assistant", "A square.")],
            0,
            6,
            "synth",
            {"kind": "shape"},
        ),
        SafetyRecord(
            "r2",
            image.read_bytes(),
            [Turn("system", "Be safe."), Turn("user", "<image>\nAnd?"), Turn("assistant", "No.")],
            3,
            1,
            "vlguard",
        ),
        SafetyRecord("r3", None, [Turn("user", "Text only")], 1, 5, "llava"),
    ]
    out = tmp_path / "out" / "data.jsonl"
    assert write_psavlm_jsonl(records, out, image_dir=tmp_path / "out" / "images") == 3
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0]["conversations"][0] == {"from": "USER", "value": "<image>\nDescribe."}
    assert lines[1]["image"] == "images/r2.png" and lines[1]["conversations"][1]["value"] == "<image>\nAnd?"
    assert lines[2]["conversations"][0]["value"] == "Text only"
    (out.parent / "img").mkdir()
    (out.parent / "img" / "a.png").write_bytes(image.read_bytes())
    back = load_records(out)
    assert back.format == "psavlm" and back.loaded == 3 and not back.skipped
    for a, b in zip(records, back.records, strict=True):
        assert (a.id, a.risk_level, a.risk_type, a.source, a.prompt, a.response) == (
            b.id,
            b.risk_level,
            b.risk_type,
            b.source,
            b.prompt,
            b.response,
        )
        assert [t.role for t in a.turns] == [t.role for t in b.turns]
    assert back.records[0].metadata["kind"] == "shape"


def test_writing_bytes_needs_an_image_dir(tmp_path):
    rec = SafetyRecord("r", b"\x89PNG...", [Turn("user", "x")], 0, 6, "t")
    with pytest.raises(ValueError, match="holds image bytes; pass image_dir="):
        write_psavlm_jsonl([rec], tmp_path / "x.jsonl")


def test_vlguard_several_instructions_of_one_kind_get_numbered_ids(tmp_path):
    entries = [
        {
            "id": "u",
            "image": "a.png",
            "safe": False,
            "harmful_category": "privacy",
            "harmful_subcategory": "personal data",
            "instr-resp": [{"instruction": "a", "response": "no"}, {"instruction": "b", "response": "no"}],
        },
        {
            "id": "s",
            "image": "a.png",
            "safe": True,
            "instr-resp": [{"safe_instruction": "a", "response": "ok"}, {"safe_instruction": "b", "response": "ok"}],
        },
    ]
    (tmp_path / "v.json").write_text(json.dumps(entries))
    report = load_records(tmp_path / "v.json", check_images=False)
    assert [r.id for r in report.records] == ["u", "u#1", "s:safe", "s:safe#1"] and not report.skipped
    assert [r.metadata["text_risk"] for r in report.records] == [False] * 4
