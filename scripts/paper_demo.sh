#!/usr/bin/env bash
# make paper-demo: every paper table and figure, reduced to Whisper base (real weights) on the demo set's real
# speech, on a 2-core CPU in under 30 minutes, then `make figures`. Each step is a resumable Hydra sweep
# (deterministic folders under $SR_OUTPUTS/multirun/<experiment>/), so running it again only does what is missing.
#
#   scripts/paper_demo.sh                 # PYTHON=.venv/bin/python SR_OUTPUTS=outputs by default
#
# A failing sweep is reported and the script goes on; make_figures aggregates whatever finished.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${SR_OUTPUTS:-outputs}
export SR_OUTPUTS="$OUT"
start=$(date +%s)
failed=()

step() {
  local t0=$(date +%s)
  echo "== $*"
  if ! "$@" > >(grep -v -e "it/s\]" -e "s/utt" -e "max_new_tokens" >&2) 2>&1; then
    failed+=("$*")
    echo "!! failed: $*" >&2
  fi
  echo "   ($(( $(date +%s) - t0 )) s)"
}

step "$PY" run.py -m experiment=main_results_demo                    # Table 1: 9 runs
step "$PY" run.py -m experiment=oracle_layers_demo                   # Fig. 2, Tables 4-5: 16 runs
step "$PY" run.py -m experiment=affinity_layers_demo                 # Fig. 4, Tables 6-7, Fig. 6 view: 24 runs
step "$PY" run.py -m experiment=fixed_ratio_demo ratio=0.8,0.6       # Table 3: 10 runs (l = 6 and the l = 0 extra)
step "$PY" run.py experiment=peer_comparison_demo intervention=none  # the comparison's vanilla (eager attention)
step "$PY" run.py -m experiment=peer_comparison_demo ratio=0.8,0.6   # the field at fixed K: 20 runs x 4 clips
step "$PY" run.py -m experiment=group_plots_demo                     # Figs. 5, 9-11: 4 runs x 3 clips
step "$PY" run.py -m experiment=trajectories_demo                    # Tables 9-10: 12 runs x 1 clip
step "$PY" -m speech_redundancy.analysis experiment=cosine_dynamics_demo   # Fig. 3: no decoding
step "$PY" scripts/make_figures.py --outputs "$OUT"

echo "paper-demo: $(( $(date +%s) - start )) s; tables and figures in $OUT/figures (see $OUT/figures/report.txt)"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'failed step: %s\n' "${failed[@]}"
  exit 1
fi
