#!/usr/bin/env bash
# Rewrite constraints.txt: install the newest versions pyproject.toml allows (install.sh --test --unpinned)
# into a new, empty virtual environment and record exactly what it resolved. Run the tests after it
# (the README's test command) before committing the new file.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
bash scripts/install.sh --test --unpinned
{
  echo "# Every package scripts/install.sh --test installs, at the version the test suite passed with."
  echo "# Made by scripts/refresh-constraints.sh on $(date -u +%Y-%m-%d) with $(python --version) on $(uname -m)."
  echo "# install.sh uses it for both README commands; --unpinned (or ADAPREC_UNPINNED=1) installs without it."
  python -m pip freeze --exclude-editable --disable-pip-version-check | LC_ALL=C sort -f
} > constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages pinned"
