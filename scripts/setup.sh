#!/usr/bin/env bash
# Set up safevlm on a fresh machine: the FigStep font, PyTorch (CPU build where one is on
# local disk), and the package with its test extras. Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/fonts/truetype/freefont/FreeMonoBold.ttf ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q fonts-freefont-ttf >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q fonts-freefont-ttf >/dev/null 2>&1; } \
    || echo "setup: could not install fonts-freefont-ttf; FigStep rendering will fall back to Pillow's font" >&2
fi

python3 -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>/dev/null \
  || python3 -m pip install -q --disable-pip-version-check "torch>=2.1"
python3 -m pip install -q --disable-pip-version-check -e ".[dev]"
