#!/usr/bin/env bash
# One-time set-up on a fresh machine: Debian data package, a virtual environment with every
# Python dependency, and CIFAR-10 unpacked from ../shared/data (when present) into ./data.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  # Fashion-MNIST, and a LaTeX engine with booktabs (the tests compile the reports' tables.tex)
  if [ ! -d /usr/share/datasets/fashion-mnist ] || ! command -v pdflatex >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends dataset-fashion-mnist texlive-latex-base \
      texlive-latex-recommended >/dev/null
  fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch + torchvision first, pinned together in constraints.txt (a CUDA build that also runs on the
# CPU; served from local disk on the project's machines), then the project with every extra the
# tests exercise.
python -m pip install -q -c constraints.txt torch torchvision
python -m pip install -q -c constraints.txt -e ".[test,fm,ray,tracking]"

TARBALL=${CIFAR10_TARBALL:-../shared/data/cifar10-jpeg.tar.gz}
if [ ! -d data/cifar10/train ] && [ -f "$TARBALL" ]; then
  mkdir -p data
  tar -xzf "$TARBALL" -C data
fi
echo "set-up done: activate with '. .venv/bin/activate'"
