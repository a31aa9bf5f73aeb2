#!/usr/bin/env bash
# Set up safevlm on a fresh machine: the FigStep font, a virtualenv (default .venv) with
# PyTorch (the CPU build where one is on local disk) and the package with its test extras.
# Safe to run twice. Afterwards run `.venv/bin/safevlm ...` or `source .venv/bin/activate`.
#
#   SAFEVLM_VENV=DIR          virtualenv to create/use (default: .venv in the repository)
#   SAFEVLM_CONSTRAINTS=FILE  pip constraints (CI uses ci/oldest.txt for the oldest supported line)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SAFEVLM_VENV:-.venv}"
FONT=/usr/share/fonts/truetype/freefont/FreeMonoBold.ttf

# System packages: FigStep renders with FreeMonoBold (Debian/Ubuntu: fonts-freefont-ttf);
# without it `safevlm data render-figstep` refuses to run unless given --font. The scan
# report's browser test drives Debian's chromium through Playwright (no browser download).
WANT=()
[ -f "$FONT" ] || WANT+=(fonts-freefont-ttf)
command -v chromium >/dev/null 2>&1 || WANT+=(chromium)
if [ ${#WANT[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="$(command -v sudo || true)"
  if [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; then
    $SUDO apt-get install -y -q "${WANT[@]}" >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q "${WANT[@]}" >/dev/null 2>&1; } \
      || true
  fi
fi
[ -f "$FONT" ] || echo "setup: FreeMonoBold.ttf is missing; install the package fonts-freefont-ttf (FigStep rendering and its tests need it)" >&2
command -v chromium >/dev/null 2>&1 || echo "setup: chromium is missing; install it (apt-get install chromium) for the scan report's browser test" >&2

PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
CONSTRAINTS=()
[ -n "${SAFEVLM_CONSTRAINTS:-}" ] && CONSTRAINTS=(-c "$SAFEVLM_CONSTRAINTS")
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
"${PIP[@]}" "torch==2.13.0" 2>/dev/null || "${PIP[@]}" "torch>=2.1"
"${PIP[@]}" "${CONSTRAINTS[@]}" -e ".[dev]"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
print("setup: " + ", ".join(f"{p} {m.version(p)}" for p in ("torch", "transformers", "peft", "accelerate", "tokenizers")))
PY
