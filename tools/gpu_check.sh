#!/usr/bin/env bash
# The prepared GPU check (see tools/gpu_check.py): install carried wheels, then run every stage.
#
#   bash tools/gpu_check.sh              # on the lent GPU machine: results in $OUT
#   bash tools/gpu_check.sh --dry-run    # on a CPU (CI does this): tiny shapes, about two minutes
#
# Wheels for what the GPU machine lacks (bitsandbytes, platformdirs) are prepared here with
# tools/gpu_wheels.sh into .whl/ and carried along; without a .whl/ folder nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x /opt/torch/.venv/bin/python3 ] && PY=/opt/torch/.venv/bin/python3
[ -n "${VIRTUAL_ENV:-}" ] && PY=python
if ls .whl/*.whl >/dev/null 2>&1; then
  site="${TMPDIR:-/tmp}/zoact-site"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels failed" >&2; exit 1; }
  if ! PYTHONPATH="$site" $PY -c "import transformers, peft, bitsandbytes" 2>/dev/null; then
    echo "gpu_check: the carried transformers/peft do not import here; using the machine's own" >&2
    rm -rf "$site"/transformers* "$site"/peft*
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
exec $PY tools/gpu_check.py "$@"
