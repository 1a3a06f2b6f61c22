#!/usr/bin/env bash
# The full GPU suite, for a machine with a CUDA GPU (budget: 10 minutes on an H100):
#
#   1. check   nvidia-smi sees a GPU; its compute capability picks TORCH_CUDA_ARCH_LIST
#   2. build   the venv and seat._C with the CUDA kernels (make build, SEAT_FORCE_CUDA=1),
#              verified by python -m seat.info (a stale CPU-only build is rebuilt)
#   3. tests   make gpu-test PYTEST_ARGS="-m cuda" (the tests that need a GPU), then
#              tests/ops -k "cuda or triton" (every op on the GPU backends, Triton compiled
#              on the GPU; stopped after SEAT_GPU_OPS_TESTS_TIMEOUT_S, default 240);
#              SEAT_GPU_TESTS=all runs the whole suite instead (make gpu-test; longer)
#   4. bench   python benchmarks/run_all.py --device cuda: every benchmark at full size,
#              including the Llama-3-8B-shaped training step (random weights, bf16,
#              gradient checkpointing) at seq 1024 within a 24 GiB budget and at seq 512
#
#   bash benchmarks/gpu.sh                      # from anywhere; runs in the repository root
#   SEAT_GPU_SH_DRY_RUN=1 bash benchmarks/gpu.sh   # print the stages, check that the make
#                                                  # targets and scripts exist, run nothing
#
# Results and this run's log (gpu_suite.log, with a timestamp per stage) go to
# benchmarks/results/<gpu name>/ (SEAT_GPU_RESULTS overrides). A failing test stage does
# not stop the benchmarks; the exit status is non-zero if any stage failed.
# Environment: VENV (default .venv), TORCH_CUDA_ARCH_LIST (default: this GPU's), MAX_JOBS,
# SEAT_GPU_TESTS (cuda | all), SEAT_GPU_BENCH_ARGS (more run_all.py arguments),
# SEAT_GPU_SH_BUDGET_S (default 600).
# Planned budget on an H100 (not yet measured: no GPU has run this script): build ~3 min
# (one arch; the venv's torch download not counted), tests ~3 min, benchmarks ~4 min, of
# which the Llama-3-8B steps ~2 min (mostly drawing the 5% masks of 7B weights on the CPU).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DRY_RUN="${SEAT_GPU_SH_DRY_RUN:-0}"
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
TESTS="${SEAT_GPU_TESTS:-cuda}"
BUDGET_S="${SEAT_GPU_SH_BUDGET_S:-600}"
OPS_TESTS_TIMEOUT_S="${SEAT_GPU_OPS_TESTS_TIMEOUT_S:-240}"
export VENV PYTHONUNBUFFERED=1

case "$TESTS" in
  cuda | all) ;;
  *) echo "SEAT_GPU_TESTS must be 'cuda' or 'all'; got '$TESTS'" >&2; exit 2 ;;
esac

slug() { tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//'; }

START=$SECONDS
FAILED=()
TIMES=()

# stage NAME CMD...: run CMD with a timestamped header and footer; record its duration.
# Returns CMD's status (callers decide whether a failure stops the suite).
stage() {
  local name="$1"; shift
  local t0=$SECONDS rc=0
  echo "=== $(date -u +%H:%M:%S) [+$((SECONDS - START)) s] stage $name: $*"
  if [[ "$DRY_RUN" == 1 ]]; then
    TIMES+=("$name: dry run")
    return 0
  fi
  "$@" || rc=$?
  local status=ok
  [[ $rc -eq 0 ]] || status="FAILED (exit $rc)"
  echo "=== $(date -u +%H:%M:%S) [+$((SECONDS - START)) s] stage $name: $status in $((SECONDS - t0)) s"
  TIMES+=("$name: $status, $((SECONDS - t0)) s")
  return "$rc"
}

finish() {
  echo "=== summary ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
  local t
  for t in "${TIMES[@]}"; do echo "  $t"; done
  local total=$((SECONDS - START))
  if [[ "$DRY_RUN" != 1 ]]; then
    if ((total <= BUDGET_S)); then
      echo "  total: $total s (budget $BUDGET_S s: within)"
    else
      echo "  total: $total s (budget $BUDGET_S s: OVER)"
    fi
  fi
  if ((${#FAILED[@]})); then
    echo "  failed stages: ${FAILED[*]}"
    return 1
  fi
  return 0
}

# ------------------------------------------------------------------ dry run: check, run nothing
if [[ "$DRY_RUN" == 1 ]]; then
  for target in build gpu-test; do
    # -n: print the recipe only; fails if the target does not exist
    make -n "$target" >/dev/null || { echo "Makefile has no target '$target'" >&2; exit 1; }
  done
  for script in benchmarks/run_all.py benchmarks/bench_seat_step.py; do
    [[ -f "$script" ]] || { echo "missing $script" >&2; exit 1; }
  done
  RESULTS="${SEAT_GPU_RESULTS:-benchmarks/results/<gpu name>}"
  ARCHS="${TORCH_CUDA_ARCH_LIST:-<compute capability of this GPU>}"
  echo "dry run: stages of benchmarks/gpu.sh (nothing is run); results and log: $RESULTS"
else
  command -v nvidia-smi >/dev/null || { echo "gpu.sh needs a CUDA GPU: nvidia-smi not found" >&2; exit 1; }
  GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)" || GPU=""
  [[ -n "$GPU" ]] || { echo "gpu.sh needs a CUDA GPU: nvidia-smi lists none" >&2; exit 1; }
  RESULTS="${SEAT_GPU_RESULTS:-benchmarks/results/$(printf '%s' "$GPU" | slug)}"
  # one arch, this GPU's: compiling the CUDA kernels for four takes minutes of the budget
  ARCHS="${TORCH_CUDA_ARCH_LIST:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1)}"
  mkdir -p "$RESULTS"
  LOG="$RESULTS/gpu_suite.log"
  exec > >(tee "$LOG") 2>&1
  echo "gpu.sh on $GPU ($(nvidia-smi --query-gpu=memory.total,driver_version --format=csv,noheader | head -n 1))," \
    "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); log: $LOG"
fi

# ------------------------------------------------------------------ 1-2. build
check_cuda_build() {
  "$PY" -m seat.info
  "$PY" - <<'PYTHON'
import json, subprocess, sys
import torch
info = json.loads(subprocess.run([sys.executable, "-m", "seat.info", "--json"], capture_output=True, text=True,
                                 check=True).stdout)
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device (a CPU build of torch, or no driver)")
if not info["native"]["with_cuda"]:
    sys.exit("seat._C was built without its CUDA kernels")
PYTHON
}

# a CPU-only seat._C can be up to date for make (its stamp is newer than the sources):
# rebuild it once, with the CUDA kernels
rebuild_if_cpu_only() {
  check_cuda_build && return 0
  echo "seat._C has no CUDA kernels: rebuilding"
  rm -f "$VENV/.built"
  SEAT_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS" make build
  check_cuda_build
}

if ! stage build env SEAT_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS" make build \
  || ! stage build-check rebuild_if_cpu_only; then
  FAILED+=(build)
  finish || true
  exit 1  # nothing else can run without the build
fi

# ------------------------------------------------------------------ 3. tests
if [[ "$TESTS" == all ]]; then
  stage tests make gpu-test TORCH_CUDA_ARCH_LIST="$ARCHS" || FAILED+=(tests)
else
  stage tests-cuda make gpu-test TORCH_CUDA_ARCH_LIST="$ARCHS" PYTEST_ARGS="-m cuda -q" || FAILED+=(tests-cuda)
  # the ops on the GPU backends only: the CPU ones are what CI runs
  stage tests-ops timeout "$OPS_TESTS_TIMEOUT_S" "$PY" -m pytest tests/ops -q -k "cuda or triton" \
    || FAILED+=(tests-ops)
fi

# ------------------------------------------------------------------ 4. benchmarks
# extra run_all.py arguments, e.g. SEAT_GPU_BENCH_ARGS="--only seat_step_llama3_8b_24gib"
read -r -a BENCH_ARGS <<<"${SEAT_GPU_BENCH_ARGS:-}"
stage bench "$PY" benchmarks/run_all.py --device cuda --out "$RESULTS" "${BENCH_ARGS[@]}" || FAILED+=(bench)

finish
