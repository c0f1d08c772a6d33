#!/usr/bin/env bash
# The GPU proof, in ONE call of the device tool (timeout_s=600), in the
# foreground. This script owns the call's time: ONE plan gives each step an
# allotment (the allotments and their kill grace sum to at most 540 s; the
# machine's start is outside the call). Each step stops ITSELF inside its
# allotment: it gets GPU_SESSION_DEADLINE (benchmarks/run_context.py), does
# its work most important first and writes its results after each piece, so a
# slow step returns partial results; `timeout` only backs that up. Measurements
# that other work adds go inside an existing step's allotment, never in a new
# step without taking its time from another. A failing step does not stop the
# next. Each step's files are copied to $OUT (default benchmarks/out) as soon
# as it ends; 8 files at most, all at the top of $OUT: run.log, facts.json,
# tests.log, bench_core.json, bench_core.png, bench_hf.json, bench_hf.png,
# bench_hf.md. Every JSON and run.log name the commit: benchmarks/COMMIT
# (ignored by git; `git rev-parse HEAD > benchmarks/COMMIT` before the call,
# sent with carry=["benchmarks/COMMIT"]: the GPU machine gets no .git).
#
# Host memory: the GPU machine's RAM grows as it is used (128 GiB in all), so
# MemAvailable at start says little. The budgets below are stated for a
# 128 GiB host, and HEADINFER_HOST_MEMORY_CHECK=warn lets headinfer's checks
# trust them (logged).
#
#   bash benchmarks/gpu_session.sh                        # the run (on the GPU machine)
#   bash benchmarks/gpu_session.sh --plan                 # the steps, their limits and the sum
#   bash benchmarks/gpu_session.sh --dry-run              # CPU stand-ins for the GPU steps (file layout)
#   bash benchmarks/gpu_session.sh --steps bench_core,bench_hf   # a subset, in plan order
#
# In --dry-run only, for tests: GPU_SESSION_FAIL=STEP[,STEP] makes those steps
# fail at once; GPU_SESSION_HANG=STEP[,STEP] makes them hang, deaf to
# SIGTERM, until their allotment (lowered to 1 s) and kill grace (1 s) run out.
#
# Exit status: 0 if every step run succeeded, 1 otherwise, 2 on bad usage.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

PYTHON=${PYTHON:-python3}
STEPS=(build facts tests bench_core bench_hf)
KILL_AFTER=5   # seconds between a step's SIGTERM at its allotment and its SIGKILL
MAX_TOTAL=540  # seconds: what the steps may take of the call's 600
MARGIN=8       # seconds of each allotment kept for writing results and exiting: the step's deadline is before it
HOST_KV_GIB=80 # the host tier of bench_hf's headinfer cache (and bench_core's bound): a 128 GiB host
declare -A LIMIT=([build]=30 [facts]=30 [tests]=90 [bench_core]=150 [bench_hf]=200)
declare -A FILES=(
  [build]="" [facts]="facts.json" [tests]="tests.log"
  [bench_core]="bench_core.json bench_core.png" [bench_hf]="bench_hf.json bench_hf.png bench_hf.md"
)
declare -A WHAT=(
  [build]="build the C++ CPU-attention kernel and the page-load kernel (Triton self-check) before anything times them"
  [facts]="machine facts: GPU, driver, torch, cores, host RAM; pinned H2D, D2H and both-ways bandwidth; host memory bandwidth (all cores); CPU attention KV read rate"
  [tests]="CUDA tests: pytest -m cuda, tests/core and tests/hf"
  [bench_core]="bench_core, Llama-3-8B layer shapes, in this order: page-load rates (the engine's path vs Triton CTA counts vs index_select vs a copy-engine copy); 128K, 16K, 4K, 512K: prefill streamed vs resident, decode vs the H2D bound, decode split vs PCIe-only; 8 requests sharing a prefix (pages loaded vs distinct); attention with and without a load beside it; one streamed layer at 128K vs a float32 reference"
  [bench_hf]="bench_hf, Llama-3-8B random bf16 on 24 GiB, host tier ${HOST_KV_GIB} GiB: standard cache's longest context (40 s search), headinfer at 32K and 128K, then its longest in the time left"
)

command_for() {  # command_for STEP WORK: the step's command line (WORK: the folder its files go to)
  local work
  work=$(printf %q "$2")
  case $1 in
    build) echo "$PYTHON benchmarks/build_kernels.py" ;;
    facts) echo "$PYTHON benchmarks/machine_facts.py --out $work" ;;
    tests) echo "$PYTHON -m pytest -q -rfE -m cuda -p no:cacheprovider tests/core tests/hf" ;;
    bench_core) echo "$PYTHON benchmarks/bench_core.py --contexts 131072 16384 4096 524288 --host-gib $HOST_KV_GIB" \
      "--out $work" ;;
    bench_hf) echo "$PYTHON benchmarks/bench_hf.py --setups dynamic,headinfer --time-budget dynamic=40" \
      "--cpu-kv-gib $HOST_KV_GIB --out $work" ;;
  esac
}

dry_run_command_for() {  # the CPU stand-in of each step: small, but writing the same files
  local work
  work=$(printf %q "$2")
  case $1 in
    build) echo "$PYTHON benchmarks/build_kernels.py" ;;
    facts) echo "$PYTHON benchmarks/machine_facts.py --smoke --out $work" ;;
    tests) echo "echo dry-run: the CUDA tests would run here" ;;
    bench_core) echo "$PYTHON benchmarks/bench_core.py --smoke --contexts 512 --layers 2 --repeats 1 --out $work" ;;
    bench_hf) echo "$PYTHON benchmarks/bench_hf.py --smoke --setups dynamic,headinfer --max-context 128" \
      "--report-contexts 64 --decode-tokens 2 --time-budget dynamic=20 --total-time 240 --out $work" ;;
  esac
}

print_plan() {
  local total=0 index=1 step
  echo "gpu_session.sh: ${#STEPS[@]} steps in one device call (timeout_s=600); each stops itself $MARGIN s" \
    "before its allotment ends"
  for step in "${STEPS[@]}"; do
    printf '  %d. %-10s allotment %3d s + %d s kill  %s\n' "$index" "$step" "${LIMIT[$step]}" "$KILL_AFTER" \
      "${WHAT[$step]}"
    printf '     %-10s files: %s\n' "" "${FILES[$step]:-(none: its output is in run.log)}"
    total=$((total + LIMIT[$step] + KILL_AFTER))
    index=$((index + 1))
  done
  echo "total: $total s of at most $MAX_TOTAL s (limits plus kill grace); files under \$OUT: run.log and the above"
}

listed() {  # listed WORD "A,B,C": whether WORD is in the comma-separated list
  [[ ",$2," == *",$1,"* ]]
}

run_step() {  # run_step STEP WORK OUT DRY: runs one step under its limit, then copies its files to OUT
  local step=$1 work=$2 out=$3 dry=$4 limit=${LIMIT[$1]} kill=$KILL_AFTER command status start file
  if [ "$dry" = 1 ]; then
    command=$(dry_run_command_for "$step" "$work")
    if listed "$step" "${GPU_SESSION_FAIL:-}"; then
      command="bash -c 'echo dry-run: injected failure >&2; exit 3'"
    elif listed "$step" "${GPU_SESSION_HANG:-}"; then
      command="bash -c 'trap \"\" TERM; sleep 600'" limit=1 kill=1  # deaf to SIGTERM: needs the SIGKILL
    fi
  else
    command=$(command_for "$step" "$work")
  fi
  start=$SECONDS
  export GPU_SESSION_DEADLINE=$(($(date +%s) + limit - (limit > 2 * MARGIN ? MARGIN : 0)))
  echo "== $(date -u +%FT%TZ) step $step (allotment ${limit} s): $command"
  if [ "$step" = tests ]; then  # its log is a file of its own, written as it goes
    eval "timeout -k $kill $limit $command" 2>&1 | tee "$out/tests.log"
  else
    eval "timeout -k $kill $limit $command" 2>&1
  fi
  status=${PIPESTATUS[0]}
  for file in ${FILES[$step]}; do
    [ -e "$work/$file" ] && cp -f "$work/$file" "$out/"
  done
  case $status in
    0) RESULT[$step]="ok" ;;
    124 | 137) RESULT[$step]="timed out (exit $status)" ;;
    *) RESULT[$step]="failed (exit $status)" ;;
  esac
  echo "== $(date -u +%FT%TZ) step $step: ${RESULT[$step]} after $((SECONDS - start)) s"
}

main() {
  local dry=$1 selected=$2 out=$3 work step failed=0
  work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_session.XXXXXX") || return 1
  trap "rm -rf '$work'" EXIT
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  export HEADINFER_COMMIT HEADINFER_HOST_MEMORY_CHECK=warn
  HEADINFER_COMMIT=${HEADINFER_COMMIT:-$(cat benchmarks/COMMIT 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)}
  echo "== gpu_session.sh$([ "$dry" = 1 ] && echo " --dry-run") $(date -u +%FT%TZ), commit $HEADINFER_COMMIT," \
    "files to $out"
  print_plan
  declare -gA RESULT=()
  for step in "${STEPS[@]}"; do
    listed "$step" "$selected" && run_step "$step" "$work" "$out" "$dry"
  done
  echo "== summary"
  for step in "${STEPS[@]}"; do
    listed "$step" "$selected" || continue
    echo "  $step: ${RESULT[$step]}"
    [ "${RESULT[$step]}" = ok ] || failed=$((failed + 1))
  done
  [ "$failed" = 0 ]
}

dry=0
selected=$(IFS=,; echo "${STEPS[*]}")
while [ $# -gt 0 ]; do
  case $1 in
    --plan) print_plan; exit 0 ;;
    --dry-run) dry=1 ;;
    --steps)
      selected=${2:?--steps needs a comma-separated list}
      shift
      for step in ${selected//,/ }; do
        [ -n "${LIMIT[$step]:-}" ] || { echo "unknown step $step; steps: ${STEPS[*]}" >&2; exit 2; }
      done ;;
    *) echo "usage: gpu_session.sh [--plan | --dry-run] [--steps STEP,...]" >&2; exit 2 ;;
  esac
  shift
done
out=${OUT:-benchmarks/out}
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
for step in "${STEPS[@]}"; do  # no file of an earlier run may pass for this one's
  for file in ${FILES[$step]}; do rm -f "$out/$file"; done
done
main "$dry" "$selected" "$out" 2>&1 | tee "$out/run.log"
exit "${PIPESTATUS[0]}"
