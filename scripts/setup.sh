#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine; safe to run again (it skips what is done).
#   - a virtual environment in .venv with torch 2.14.1 / torchvision 0.29.1 and this package
#   - Debian's dataset-fashion-mnist package (the embedded default dataset)
#   - with --test: the checkers of scripts/check (extras lint and docs: ruff, mypy, mkdocs), and
#     Debian's chromium and chromium-driver, the browser of the web page's tests
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if [ ! -x .venv/bin/python ]; then
  if ! python3 -m venv .venv 2>/dev/null; then
    as_root apt-get update -qq && as_root apt-get install -y -qq python3-venv python3-pip
    python3 -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
if [ "${1:-}" = "--test" ]; then  # and what scripts/check runs: ruff, mypy, mkdocs
  .venv/bin/python -m pip install -q -e '.[test,video,lint,docs]'
else
  .venv/bin/python -m pip install -q -e '.[test,video]'
fi

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  as_root apt-get update -qq
  as_root apt-get install -y -qq dataset-fashion-mnist
fi
if [ "${1:-}" = "--test" ] && ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
fi
echo "set-up done: .venv ready, Fashion-MNIST in /usr/share/datasets/fashion-mnist"
