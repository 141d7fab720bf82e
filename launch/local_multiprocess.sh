#!/usr/bin/env bash
# Runs one calm-train job as N local processes over gloo: the multi-host path without a cluster.
#
# Usage:
#   launch/local_multiprocess.sh [--dry-run] N CONFIG WORKDIR [overrides...]
#
# Each process K gets JAX_NUM_CPU_DEVICES CPU devices (default 2) and runs
#   calm-train --config CONFIG --workdir WORKDIR --distributed=on \
#     --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=K [overrides...]
# with its log in WORKDIR/logs/process_K.log. The script waits for all of them and
# exits non-zero (after stopping the others) as soon as one fails.
#
# Worked example (2 processes x 2 CPU devices = the same 4-device mesh as
# JAX_NUM_CPU_DEVICES=4 calm-train ... in one process):
#   launch/local_multiprocess.sh 2 experiments/autoencoder.py:size=tiny workdirs/ae_mp \
#     --config.train.steps=20
#
# Environment:
#   JAX_NUM_CPU_DEVICES  CPU devices per process (default 2)
#   CALM_TRAIN           the trainer command (default calm-train; e.g.
#                        "python -m calm_jax.train" when the package is not installed)
#   COORDINATOR_PORT     port of process 0's coordinator (default: a free port)
#   PYTHON               python used to pick a free port (default python3)
set -euo pipefail

SCRIPT_PATH="${BASH_SOURCE[0]}"
SCRIPT_USAGE="launch/local_multiprocess.sh [--dry-run] N CONFIG WORKDIR [overrides...]"
source "$(dirname "$SCRIPT_PATH")/lib.sh"
if (( BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1) )); then
  die "bash >= 5.1 is needed (wait -n -p); this is bash $BASH_VERSION."
fi
parse_args "$@"
require_args 3 N CONFIG WORKDIR
NUM_PROCESSES="${POSITIONAL[0]}"
CONFIG="${POSITIONAL[1]}"
WORKDIR="${POSITIONAL[2]}"
OVERRIDES=("${POSITIONAL[@]:3}")
if ! [[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]]; then
  die "N='$NUM_PROCESSES' must be a positive integer (the number of processes)."
fi
DEVICES="${JAX_NUM_CPU_DEVICES:-2}"
if ! [[ "$DEVICES" =~ ^[1-9][0-9]*$ ]]; then
  die "JAX_NUM_CPU_DEVICES='$DEVICES' must be a positive integer (CPU devices per process)."
fi
read -r -a TRAIN_CMD <<< "${CALM_TRAIN:-calm-train}"
if [[ ${#TRAIN_CMD[@]} -eq 0 ]]; then
  die "CALM_TRAIN is empty; unset it or set it to e.g. 'python -m calm_jax.cli.train'."
fi

free_port() {
  "${PYTHON:-python3}" -c \
    'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
PORT="${COORDINATOR_PORT:-$(free_port)}"
LOG_DIR="$WORKDIR/logs"

set_command() {  # process id -> CMD, the command line of that process
  CMD=("${TRAIN_CMD[@]}" --config "$CONFIG" --workdir "$WORKDIR" --distributed=on
       "--coordinator_address=127.0.0.1:$PORT" "--num_processes=$NUM_PROCESSES"
       "--process_id=$1" "${OVERRIDES[@]}")
}

echo "Plan: $NUM_PROCESSES processes x $DEVICES CPU devices over gloo, coordinator 127.0.0.1:$PORT"
for ((k = 0; k < NUM_PROCESSES; k++)); do
  set_command "$k"
  echo "process $k: JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$DEVICES $(quote "${CMD[@]}")" \
    "> $(quote "$LOG_DIR/process_$k.log") 2>&1"
done
if [[ $DRY_RUN -eq 1 ]]; then
  echo "(dry run: nothing started)"
  exit 0
fi

mkdir -p "$LOG_DIR"
PIDS=()
stop_all() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM
for ((k = 0; k < NUM_PROCESSES; k++)); do
  set_command "$k"
  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES="$DEVICES" "${CMD[@]}" > "$LOG_DIR/process_$k.log" 2>&1 &
  PIDS+=($!)
done

declare -A RUNNING   # pid -> process id
for k in "${!PIDS[@]}"; do RUNNING[${PIDS[$k]}]=$k; done
status=0
while [[ ${#RUNNING[@]} -gt 0 ]]; do
  finished=""
  rc=0
  wait -n -p finished "${!RUNNING[@]}" || rc=$?
  if [[ -z "$finished" ]]; then   # no child left to wait for
    break
  fi
  k="${RUNNING[$finished]}"
  unset "RUNNING[$finished]"
  if [[ $rc -ne 0 ]]; then
    echo "error: process $k exited with status $rc; stopping the others. Last lines of $LOG_DIR/process_$k.log:" >&2
    tail -n 25 "$LOG_DIR/process_$k.log" >&2 || true
    status=$rc
    stop_all
    wait || true
    break
  fi
  echo "process $k finished."
done
trap - INT TERM
if [[ $status -ne 0 ]]; then
  exit "$status"
fi
echo "All $NUM_PROCESSES processes finished; logs in $LOG_DIR."
