#!/usr/bin/env bash
# The GPU run for a session lent the `device` tool's H100 (or H200): the CUDA
# tests, then the benchmarks, about 15-24 minutes in all. A device call may
# last 10 minutes, so the run goes on in a process session of its own (which
# outlives the call while the machine is held), and every call waits for it
# and brings back what it has so far:
#
#   bash benchmarks/gpu_session.sh start   # 1st call: copy the tree, start the run, then wait as below
#   bash benchmarks/gpu_session.sh wait    # later calls: wait up to 9.5 minutes; copy the results to $OUT
#   bash benchmarks/gpu_session.sh run     # the same steps in the foreground
#
# Run each call with timeout_s=600 and without pauses between calls: an idle
# machine goes back after 30 s, and the run with it. Steps, each under its own
# time limit, most important first (a later one may be cut by the session's
# 30 device minutes): CUDA tests, bench_hf dynamic, headinfer and offloaded
# (one process each, merged into one report), bench_core. The files (the
# device tool brings back 8): run.log, tests.log, bench_hf.{json,png,md},
# bench_core.{json,png}. Commit them to benchmarks/results/, and give the
# machine back (the device tool's give_back) after the last call.
set -uo pipefail
work=/tmp/headinfer_gpu
results=$work/results

run_steps() {
  cd "$work/src" || exit 1
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  mkdir -p "$results"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  free -g
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  # Limits: bench_hf's budget, plus its grace (20%), model build, warm-up and host pinning.
  step 150 tests python3 -m pytest -q -m cuda -p no:cacheprovider tests/core tests/hf
  step 150 hf-dynamic python3 benchmarks/bench_hf.py --setups dynamic --time-budget 90 --out "$results"
  step 720 hf-headinfer python3 benchmarks/bench_hf.py --setups headinfer --time-budget 500 --out "$results"
  step 240 hf-offloaded python3 benchmarks/bench_hf.py --setups offloaded --time-budget 150 --out "$results"
  step 180 core python3 benchmarks/bench_core.py --out "$results"
  echo "$(date -u +%FT%TZ) all steps done"
}

step() {  # step SECONDS NAME COMMAND...: runs COMMAND under a time limit; a failure does not stop the run
  local limit=$1 name=$2
  shift 2
  echo "$(date -u +%FT%TZ) step $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$work/$name.out"
  echo "$(date -u +%FT%TZ) step $name exit ${PIPESTATUS[0]}"
}

collect() {  # collect SECONDS: wait for the run to finish, at most SECONDS; copy what it has to $OUT
  local out=${OUT:-benchmarks/out} waited=0
  if [ ! -e "$work/run.log" ]; then
    echo "no run on this machine (a fresh one: the last was given back); use 'start'" >&2
    return 1
  fi
  while [ ! -e "$work/finished" ] && [ "$waited" -lt "$1" ]; do
    if [ -e "$work/pid" ] && ! kill -0 "$(cat "$work/pid")" 2>/dev/null; then
      break  # the run ended without marking itself finished (killed)
    fi
    sleep 10
    waited=$((waited + 10))
  done
  mkdir -p "$out"
  cp "$work/run.log" "$results"/* "$out"/ 2>/dev/null
  [ -e "$work/tests.out" ] && cp "$work/tests.out" "$out/tests.log"
  tail -n 60 "$work/run.log"
  if [ -e "$work/finished" ]; then
    echo "== the run has finished"
  elif [ -e "$work/pid" ] && ! kill -0 "$(cat "$work/pid")" 2>/dev/null; then
    echo "== the run died before finishing; see run.log"
    return 1
  else
    echo "== still running: call 'wait' again"
  fi
}

copy_tree() {  # a fresh $work with a copy of the tree: later calls re-send the working tree while the run reads it
  rm -rf "$work" && mkdir -p "$work/src"
  tar --exclude=.git -cf - -C "$(dirname "$0")/.." . | tar -xf - -C "$work/src"
}

case "${1:?usage: gpu_session.sh start | wait | run}" in
  start)
    if [ -e "$work/pid" ] && kill -0 "$(cat "$work/pid")" 2>/dev/null; then
      echo "a run is already going; waiting for it"
    elif [ -e "$work/finished" ]; then
      echo "a run has finished on this machine; its results follow (rm -rf $work to run again)"
    else
      copy_tree
      : > "$work/run.log"
      setsid bash -c "bash '$work/src/benchmarks/gpu_session.sh' run-steps >> '$work/run.log' 2>&1; touch '$work/finished'" \
        < /dev/null > /dev/null 2>&1 &
      echo $! > "$work/pid"
    fi
    collect 560 ;;
  wait) collect 570 ;;
  run)
    copy_tree
    run_steps 2>&1 | tee "$work/run.log"
    OUT=${OUT:-benchmarks/out} collect 0 > /dev/null ;;
  run-steps) run_steps ;;
  *) echo "unknown command $1; use start, wait or run" >&2; exit 2 ;;
esac
