"""Numbers and commands the README states are checked against the code."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _size_rows() -> dict[str, list[str]]:
    rows = {}
    for line in README.splitlines():
        match = re.match(r"^\| (llava-[\w.-]+) \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = [c.strip() for c in match.group(2).split("|")]
    return rows


def test_readme_lists_both_paper_sizes():
    assert set(_size_rows()) == {"llava-1.5-7b", "llava-1.5-13b"}


@pytest.mark.parametrize("base", ["llava-1.5-7b", "llava-1.5-13b"])
def test_readme_parameter_figures_match_safevlm_params(base):
    out = subprocess.run(
        [sys.executable, "-m", "safevlm.cli", "params", "--base", base, "--json"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    result = json.loads(out.stdout)
    base_params, safety, share, adapter = _size_rows()[base]
    assert base_params == f"{result['base_params']:,}"
    assert safety == f"{result['safety_params']:,}"
    assert share == f"{100 * result['ratio']:.3f}%"
    assert adapter == f"{result['adapter_bytes_bf16'] / 2**20:.1f} MiB"


def test_readme_commands_are_the_ones_ci_runs():
    block = README.split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]
    assert lines == [
        "bash scripts/setup.sh && .venv/bin/safevlm demo --out demo_out",
        "bash scripts/setup.sh && .venv/bin/python -m pytest -q",
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'SAFEVLM_VENV="$venv"' in ci and "bash scripts/setup.sh" in ci
    assert '"$venv/bin/python" -m pytest -q' in ci
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert 'VENV="${SAFEVLM_VENV:-.venv}"' in setup
