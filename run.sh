#!/usr/bin/env bash
# Set srum up in a virtual environment (first run, or after pyproject.toml changes), then run a command in it:
#   bash run.sh demo [ARGS]   the main job on the embedded default
#   bash run.sh test [ARGS]   the test suite (pytest)
#   bash run.sh ARGS          any srum subcommand, e.g. `bash run.sh model params --preset tiny`
set -euo pipefail
cd "$(dirname "$0")"
venv="${SRUM_VENV:-.venv}"
python="$venv/bin/python"
[ -x "$python" ] || python3 -m venv "$venv"
stamp="$venv/.srum-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$python" -m pip install --quiet --upgrade pip
    # Without CUDA take the CPU wheel; a GPU machine keeps (or gets) the CUDA build through the dependencies.
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        "$python" -m pip install --quiet torch==2.13.0
    fi
    "$python" -m pip install --quiet -e ".[dev]"
    touch "$stamp"
fi
case "${1:-}" in
    test) shift; exec "$python" -m pytest "$@" ;;
    demo) shift
        echo "srum demo: online SRUM on ShapeWorld (configs/shapes.yaml): the base is measured, trained with its own"
        echo "judgement, measured again; the report is written to runs/shapes/report."
        exec "$venv/bin/srum" fit --config configs/shapes.yaml "$@" ;;
    *) exec "$venv/bin/srum" "$@" ;;
esac
