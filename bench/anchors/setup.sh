#!/usr/bin/env bash
# Build the anchor systems' virtualenvs for side-by-side benchmarks:
#   bench/.venv-hivemind  hivemind (torch pinned to the local CPU build first: an
#                         unpinned torch pulls gigabytes of CUDA packages)
#   bench/.venv-lattica   lattica (Rust core, PyPI)
#   bench/.venv-mergekit  mergekit 0.1.5 (torch pinned to the local CPU build first, as above)
# Idempotent: an existing, working venv is kept.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}

make_venv() {  # name, check-import, packages...
  local dir=$here/.venv-$1 mod=$2; shift 2
  if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c "import $mod" 2>/dev/null; then
    return 0
  fi
  echo "anchors: building $dir ($*)" >&2
  "$py" -m venv "$dir"
  "$dir/bin/pip" install -q --upgrade pip >/dev/null
  for spec in "$@"; do
    "$dir/bin/pip" install -q $spec
  done
}

make_venv hivemind hivemind "torch==2.13.0" "hivemind numpy"
make_venv lattica lattica "lattica numpy"
make_venv mergekit mergekit "torch==2.13.0" "mergekit==0.1.5"
echo "anchors: ready" >&2
