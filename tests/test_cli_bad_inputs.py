"""User mistakes on the command line end as one line, ``safevlm <command>: error: ...`` naming
the file or flag, with exit status 2 and no traceback.

One table for every command (in-process ``main()``: a traceback would fail the test), plus
the cases only a real process shows (a traceback on stderr, a closed output pipe).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import png_bytes, truncated_png, write_image

from safevlm.cli import is_user_error, main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def files(tmp_path):
    """Bad inputs of every kind, in one folder."""
    truncated_png(tmp_path / "cut.png")
    (tmp_path / "bomb.png").write_bytes(png_bytes(20_000, 20_000))  # 69 bytes claiming 400M pixels
    (tmp_path / "huge.png").write_bytes(png_bytes(10_000, 10_000))  # 100M pixels: over the 89.5M limit
    (tmp_path / "notes.png").write_text("not a picture")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "a_file").write_text("I am a file")
    write_image(tmp_path / "ok.png")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    (tmp_path / "nosuch_parent.yaml").write_text("version: 1\nextends: nosuch\n")
    (tmp_path / "level7.yaml").write_text("version: 1\nextends: default\nrules:\n  default: {refuse_level: 7}\n")
    (tmp_path / "broken.json").write_text('[\n  {"id": 1, "conversations": []}\n  {"id": 2}\n]\n')
    (tmp_path / "b.csv").write_text("dataset,category_id,task_id,instruction\nForbidQI,1,1,Steps.\n")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    (tmp_path / "adapter").mkdir()
    return tmp_path


M = ["--model", "{d}/base"]  # never loaded: every error below comes first

# (command line, words the one-line error must contain); "{d}" is the fixture folder
CASES = {
    "classify truncated png": (["classify", *M, "--image", "{d}/cut.png"], ["truncated or corrupt image", "{d}/cut.png"]),
    "classify 20000x20000 png": (["classify", *M, "--image", "{d}/bomb.png"],
                                 ["400,000,000 pixels, over the decompression-bomb limit", "{d}/bomb.png"]),
    "classify 10000x10000 png": (["classify", *M, "--image", "{d}/huge.png"],
                                 ["10000x10000 = 100,000,000 pixels, over the decompression-bomb limit of 89,478,485",
                                  "{d}/huge.png"]),
    "classify not an image": (["classify", *M, "--image", "{d}/notes.png"], ["file is not an image", "{d}/notes.png"]),
    "classify missing file": (["classify", *M, "--image", "{d}/gone.png"], ["missing image file", "{d}/gone.png"]),
    "classify folder without images": (["classify", *M, "--image", "{d}/empty_dir"],
                                       ["folder '{d}/empty_dir' holds no image files"]),
    "classify glob matching nothing": (["classify", *M, "--image", "{d}/*.webp"], ["no file matches '{d}/*.webp'"]),
    "classify --out exists": (["classify", *M, "--image", "{d}/ok.png", "--out", "{d}/a_file"],
                              ["--out '{d}/a_file' exists; choose another --out or pass --overwrite"]),
    "classify --out is a folder": (["classify", *M, "--image", "{d}/ok.png", "--out", "{d}/full"],
                                   ["--out '{d}/full' is a folder"]),
    "classify --batch-size 0": (["classify", *M, "--image", "{d}/ok.png", "--batch-size", "0"],
                                ["--batch-size must be >= 1, got 0"]),
    "classify --device foo": (["classify", *M, "--image", "{d}/ok.png", "--device", "foo"],
                              ["argument --device: unknown device 'foo'; use cpu, cuda, cuda:N"]),
    "classify --device cuda:99": (["classify", *M, "--image", "{d}/ok.png", "--device", "cuda:99"],
                                  ["argument --device: device 'cuda:99' asked for, but"]),
    "classify policy extends nosuch": (["classify", *M, "--image", "{d}/ok.png", "--policy", "{d}/nosuch_parent.yaml"],
                                       ["{d}/nosuch_parent.yaml: extends: unknown policy 'nosuch'"]),
    "classify policy level 7": (["classify", *M, "--image", "{d}/ok.png", "--policy", "{d}/level7.yaml"],
                                ["{d}/level7.yaml: rules.default: refuse_level must be a risk level 1..3 "
                                 "(low, medium, high), got 7"]),
    "chat truncated png": (["chat", *M, "--image", "{d}/cut.png", "--prompt", "hi"], ["truncated or corrupt", "{d}/cut.png"]),
    "chat 20000x20000 png": (["chat", *M, "--image", "{d}/bomb.png", "--prompt", "hi"],
                             ["over the decompression-bomb limit", "{d}/bomb.png"]),
    "chat directory": (["chat", *M, "--image", "{d}/empty_dir", "--prompt", "hi"],
                       ["image path is not a file: '{d}/empty_dir'"]),
    "chat --device foo": (["chat", *M, "--device", "foo", "--prompt", "hi"], ["unknown device 'foo'"]),
    "chat --max-new-tokens 0": (["chat", *M, "--max-new-tokens", "0", "--prompt", "hi"],
                                ["--max-new-tokens must be >= 1, got 0"]),
    "tiny build --out file": (["tiny", "build", "--out", "{d}/a_file", "--preset", "test"],
                              ["--out '{d}/a_file' is an existing file, not a folder"]),
    "tiny build --out non-empty folder": (["tiny", "build", "--out", "{d}/full", "--preset", "test"],
                                          ["--out '{d}/full' exists and is not empty", "--overwrite"]),
    "render-figstep --out file": (["data", "render-figstep", "--csv", "{d}/b.csv", "--out", "{d}/a_file"],
                                  ["--out '{d}/a_file' is an existing file, not a folder"]),
    "render-figstep --limit -1": (["data", "render-figstep", "--csv", "{d}/b.csv", "--out", "{d}/imgs", "--limit", "-1"],
                                  ["--limit", "must be an integer >= 0, got -1"]),
    "render-figstep --font missing": (["data", "render-figstep", "--csv", "{d}/b.csv", "--out", "{d}/imgs",
                                       "--font", "{d}/nope.ttf"], ["font file not found: {d}/nope.ttf"]),
    "render-figstep missing csv": (["data", "render-figstep", "--csv", "{d}/nope.csv", "--out", "{d}/imgs"],
                                   ["no such CSV file: {d}/nope.csv"]),
    "data check broken json": (["data", "check", "{d}/broken.json"],
                               ["{d}/broken.json:3:3: malformed JSON: Expecting ',' delimiter"]),
    "data check missing file": (["data", "check", "{d}/nope.jsonl"], ["no such data file: {d}/nope.jsonl"]),
    "merge --out is --base": (["merge", "--base", "{d}/base", "--adapter", "{d}/adapter", "--out", "{d}/base",
                               "--overwrite"], ["--out '{d}/base' is the --base folder"]),
    "merge --out inside --base": (["merge", "--base", "{d}/base", "--adapter", "{d}/adapter", "--out", "{d}/base/m",
                                   "--overwrite"], ["--out '{d}/base/m' lies inside the --base folder '{d}/base'"]),
    "merge --base inside --out": (["merge", "--base", "{d}/base", "--adapter", "{d}/adapter", "--out", "{d}",
                                   "--overwrite"], ["the --base folder '{d}/base' lies inside --out '{d}'"]),
    "merge --out is --adapter": (["merge", "--base", "{d}/base", "--adapter", "{d}/adapter", "--out", "{d}/adapter",
                                  "--overwrite"], ["--out '{d}/adapter' is the --adapter folder"]),
    "policy show unknown": (["policy", "show", "lenient"], ["unknown policy 'lenient'; shipped: default"]),
    "policy show missing file": (["policy", "show", "{d}/gone.yaml"], ["policy file not found: {d}/gone.yaml"]),
    "params unknown base": (["params", "--base", "{d}/nothing"], ["--base '{d}/nothing' is neither"]),
    "train without --config": (["train"], ["--config FILE.yaml is required"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_mistakes_exit_2_with_one_line_naming_the_file(files, capsys, case):
    argv, words = CASES[case]
    argv = [a.replace("{d}", str(files)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse reports flag errors itself (exit status 2)
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"safevlm {argv[0]}") and ": error: " in lines[-1], err
    assert "Traceback" not in err
    for word in words:
        assert word.replace("{d}", str(files)) in lines[-1], (word, err)
    # nothing was replaced or created by a refused command
    assert (files / "full" / "keep.txt").read_text() == "precious" and (files / "base" / "config.json").exists()
    assert (files / "a_file").read_text() == "I am a file" and not (files / "imgs").exists()


def test_cuda_on_a_cpu_only_torch_names_the_fix(files, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(SystemExit) as exit_info:
        main(["classify", "--model", str(files), "--image", str(files / "ok.png"), "--device", "cuda"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "device 'cuda' asked for, but this PyTorch build has no CUDA support" in err and "use --device cpu" in err


def test_interactive_chat_survives_a_bad_image(files):
    from safevlm.commands.chat import interactive

    class Session:  # the conversation's interface, without a model
        policy = type("P", (), {"name": "default"})()

        def __init__(self):
            self.images = []

        def set_image(self, image):
            self.images.append(image.size if image is not None else None)

        def reset(self):
            pass

        def ask(self, prompt):
            from safevlm.guarded import GuardedResult

            return GuardedResult(text=f"answer to {prompt}", action="allow", risk_level=0, risk_type="safe",
                                 level_probs=[1.0, 0, 0, 0], type_probs={"safe": 1.0})

    session, out = Session(), io.StringIO()
    script = (f"/image {files}/bomb.png\n/image {files}/cut.png\n/image {files}/empty_dir\n"
              f"/image {files}/ok.png\nWhat is it?\n/quit\n")
    assert interactive(session, io.StringIO(script), out, as_json=True) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[error: image is 400,000,000 pixels, over the decompression-bomb limit")
    assert f"{files}/bomb.png" in lines[0]
    assert lines[1].startswith("[error: truncated or corrupt image") and f"{files}/cut.png" in lines[1]
    assert lines[2] == f"[error: image path is not a file: '{files}/empty_dir']"
    assert lines[3] == f"[new conversation about {files}/ok.png]" and session.images == [(8, 6)]
    answer = json.loads(lines[4])
    assert answer["image"] == f"{files}/ok.png" and answer["policy"] == "default" and answer["prompt"] == "What is it?"


def test_only_user_errors_are_reported_without_a_traceback():
    from safevlm.data import ImageError
    from safevlm.errors import UsageError

    assert is_user_error(UsageError("x")) and is_user_error(ImageError("x")) and is_user_error(FileExistsError("x"))
    assert not is_user_error(KeyError("x")) and not is_user_error(TypeError("x"))
    assert not is_user_error(ValueError("from somewhere else"))  # no traceback: not raised by safevlm
    # a ValueError raised by a library call (torch, numpy, int()) is a bug, even inside safevlm
    import numpy as np

    try:
        np.zeros(3).reshape(2, 2)
    except ValueError as err:
        assert not is_user_error(err)
    from safevlm.data.figstep import figstep_image_name

    try:
        figstep_image_name("ForbidQI", "x", 1)  # int("x") on a line of safevlm that is not a `raise`
    except ValueError as err:
        assert not is_user_error(err)
    # a `raise ValueError(...)` in safevlm's own code is a message for the user
    from safevlm.policy import load_policy

    try:
        load_policy("lenient")
    except ValueError as err:
        assert type(err) is ValueError and is_user_error(err)
    from safevlm.taxonomy import DEFAULT_TAXONOMY

    try:
        DEFAULT_TAXONOMY.level_id("bogus")  # a `raise ValueError(` spread over several lines
    except ValueError as err:
        assert "unknown risk level 'bogus'" in str(err) and is_user_error(err)


def test_a_bug_keeps_its_traceback(monkeypatch):
    import safevlm.commands.params as params

    def broken(args):
        return int("not a number")  # a ValueError that is not a user's mistake

    monkeypatch.setattr(params, "command", broken)  # register() picks it up when main() builds the parser
    with pytest.raises(ValueError, match="invalid literal"):
        main(["params"])


# -- what only a real process shows -----------------------------------------------------------------


def _run(*argv, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "safevlm.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120, **kwargs)


def test_a_real_process_prints_one_line_and_no_traceback(files):
    result = _run("classify", "--model", str(files / "base"), "--image", str(files / "bomb.png"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"safevlm classify: error: image is 400,000,000 pixels, over the decompression-bomb limit of "
        f"89,478,485 pixels: {files}/bomb.png"
    ]


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    # `safevlm data check big.jsonl | head -1`: the reader leaves after one line
    data = tmp_path / "big.jsonl"
    data.write_text("{broken\n" * 20_000)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen([sys.executable, "-m", "safevlm.cli", "data", "check", str(data), "--format", "psavlm"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read().decode()
    code = process.wait(timeout=120)
    assert first.decode().startswith(f"{data} (format: ")
    assert stderr == "" and code == 141  # 128 + SIGPIPE, as for `cat`; no BrokenPipeError traceback
