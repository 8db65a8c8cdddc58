#!/usr/bin/env bash
# Install, then run the whole test suite (the README's test command; .ci/run calls it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# the integrations' extras, so their tests run rather than skip (torch stays pinned to the CPU wheel)
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[tensorboard,mlflow,lightning,huggingface]"
if ! command -v chromium >/dev/null 2>&1; then
  # the HTML report test renders the page in headless Chromium (Debian package)
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will be skipped"
fi
python -m ruff check src tests bench
python -m pytest tests -p no:cacheprovider
