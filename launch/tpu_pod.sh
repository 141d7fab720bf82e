#!/usr/bin/env bash
# Runs calm-train on every worker of a Cloud TPU VM slice (single host or pod) with gcloud.
#
# Usage:
#   [VARIABLES=...] launch/tpu_pod.sh [--dry-run] CONFIG WORKDIR [overrides...]
#
# Steps: (1) create the TPU VM unless it exists (reuse), (2) copy the code to every
# worker (a `git archive HEAD` of this checkout over gcloud scp, or a git clone/pull of
# REPO_URL), (3) install it into a venv (pip install -e . plus jax[tpu]), (4) run
#   calm-train --config CONFIG --workdir WORKDIR --distributed=on [overrides...]
# on --worker=all. JAX finds its peers from the TPU metadata. Each worker logs to
# ~/calm_logs/RUN_NAME.<hostname>.log (fetch one with
# gcloud compute tpus tpu-vm scp TPU_NAME:~/calm_logs/RUN_NAME.* . --worker=K ...).
# --dry-run prints these commands and runs nothing.
#
# WORKDIR, the data and the tokenizer must be paths every worker sees (orbax
# checkpoints are written by all workers into one directory): an NFS share
# (Filestore) or a gcsfuse mount, set up by SETUP_CMD.
#
# Required variables:
#   TPU_NAME          name of the TPU VM (created if it does not exist)
#   ZONE              e.g. us-east5-a
#   PROJECT           the Google Cloud project id
#   ACCELERATOR_TYPE  e.g. v5p-64, v4-32, v5litepod-16, v6e-64
#   RUNTIME_VERSION   TPU VM image, e.g. v2-alpha-tpuv5 (v5p), tpu-ubuntu2204-base (v4),
#                     v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv6e (v6e)
# Optional variables:
#   REPO_URL          git URL to clone/pull on the workers instead of copying this checkout
#   GIT_REF           branch, tag or commit of REPO_URL (default main)
#   REMOTE_DIR        code directory on the workers, relative to ~ (default calm_jax)
#   VENV              venv on the workers, relative to ~ (default calm_venv)
#   JAX_TPU_SPEC      pip requirement for JAX on TPU (default 'jax[tpu]>=0.10.2,<0.11')
#   SETUP_CMD         shell run on every worker after install (e.g. mount the shared WORKDIR)
#   SPOT=1            create the TPU VM as spot capacity
#   SKIP_INSTALL=1    skip step 3 (code already installed)
#   DETACH=1          start training in the background (nohup) and return; follow it with
#                     gcloud compute tpus tpu-vm ssh TPU_NAME --worker=0 --command='tail -f ~/calm_logs/RUN_NAME.*'
#   RUN_NAME          log file prefix (default calm-<UTC time>)
#
# Worked example: CALM-M on a v5p-64 (32 chips = 8 workers x 4 chips; mesh=v5p-64 is data=4 x fsdp=8),
# after its autoencoder run, with a Filestore share mounted at /mnt/shared:
#   TPU_NAME=calm-m ZONE=us-east5-a PROJECT=my-project ACCELERATOR_TYPE=v5p-64 \
#   RUNTIME_VERSION=v2-alpha-tpuv5 \
#   SETUP_CMD='sudo mkdir -p /mnt/shared && sudo mount -t nfs 10.0.0.2:/shared /mnt/shared' \
#   launch/tpu_pod.sh experiments/calm.py:size=M,mesh=v5p-64 /mnt/shared/runs/calm_m \
#     --config.autoencoder.workdir=/mnt/shared/runs/ae_base \
#     --config.data.train='arrayrecord:/mnt/shared/data/train'
set -euo pipefail

SCRIPT_PATH="${BASH_SOURCE[0]}"
SCRIPT_USAGE="launch/tpu_pod.sh [--dry-run] CONFIG WORKDIR [overrides...]"
source "$(dirname "$SCRIPT_PATH")/lib.sh"
parse_args "$@"
require_args 2 CONFIG WORKDIR
require_vars TPU_NAME=calm-m ZONE=us-east5-a PROJECT=my-project ACCELERATOR_TYPE=v5p-64 \
  RUNTIME_VERSION=v2-alpha-tpuv5
require_tool gcloud "install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install)"
CONFIG="${POSITIONAL[0]}"
WORKDIR="${POSITIONAL[1]}"
OVERRIDES=("${POSITIONAL[@]:2}")
REMOTE_DIR="${REMOTE_DIR:-calm_jax}"
VENV="${VENV:-calm_venv}"
JAX_TPU_SPEC="${JAX_TPU_SPEC:-jax[tpu]>=0.10.2,<0.11}"
RUN_NAME="${RUN_NAME:-calm-$(date -u +%Y%m%d-%H%M%S)}"
TARGET=(--zone="$ZONE" --project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)

on_all_workers() {  # remote shell command -> run it with gcloud ssh on every worker
  run_cmd "${TPU[@]}" ssh "$TPU_NAME" "${TARGET[@]}" --worker=all --command="$1"
}

echo "Plan: calm-train on every worker of $ACCELERATOR_TYPE TPU VM '$TPU_NAME' ($PROJECT, $ZONE)"

echo "# 1. Create the TPU VM unless it exists"
CREATE=("${TPU[@]}" create "$TPU_NAME" "${TARGET[@]}" --accelerator-type="$ACCELERATOR_TYPE"
        --version="$RUNTIME_VERSION")
if [[ "${SPOT:-0}" == 1 ]]; then
  CREATE+=(--spot)
fi
DESCRIBE=("${TPU[@]}" describe "$TPU_NAME" "${TARGET[@]}" "--format=value(state)")
if [[ $DRY_RUN -eq 1 ]]; then
  echo "+ $(quote "${DESCRIBE[@]}") || $(quote "${CREATE[@]}")"
elif state="$("${DESCRIBE[@]}" 2>/dev/null)"; then
  echo "TPU VM $TPU_NAME exists (state $state); reusing it."
else
  run_cmd "${CREATE[@]}"
fi

echo "# 2. Copy the code to every worker"
if [[ -n "${REPO_URL:-}" ]]; then
  GIT_REF="${GIT_REF:-main}"
  on_all_workers "set -e; if [ -d ~/$REMOTE_DIR/.git ]; then git -C ~/$REMOTE_DIR fetch --quiet origin; else git clone --quiet $(quote "$REPO_URL") ~/$REMOTE_DIR; fi; git -C ~/$REMOTE_DIR checkout --quiet $(quote "$GIT_REF"); git -C ~/$REMOTE_DIR pull --quiet --ff-only origin $(quote "$GIT_REF") || true"
else
  REPO_ROOT="$(cd "$(dirname "$SCRIPT_PATH")/.." && pwd)"
  TARBALL="${TMPDIR:-/tmp}/calm_jax-$RUN_NAME.tar.gz"
  run_cmd git -C "$REPO_ROOT" archive --format=tar.gz -o "$TARBALL" HEAD
  run_cmd "${TPU[@]}" scp "$TARBALL" "$TPU_NAME:calm_jax.tar.gz" "${TARGET[@]}" --worker=all
  on_all_workers "set -e; rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/calm_jax.tar.gz -C ~/$REMOTE_DIR"
fi

echo "# 3. Install (pip install -e . into ~/$VENV)"
if [[ "${SKIP_INSTALL:-0}" == 1 ]]; then
  echo "(skipped: SKIP_INSTALL=1)"
else
  on_all_workers "set -e; python3 -m venv ~/$VENV && ~/$VENV/bin/pip install --quiet --upgrade pip && cd ~/$REMOTE_DIR && ~/$VENV/bin/pip install --quiet -e . \"$JAX_TPU_SPEC\""
fi
if [[ -n "${SETUP_CMD:-}" ]]; then
  on_all_workers "set -e; $SETUP_CMD"
fi

echo "# 4. Train on all workers (logs: ~/calm_logs/$RUN_NAME.<hostname>.log on each worker)"
TRAIN="~/$VENV/bin/calm-train $(quote --config "$CONFIG" --workdir "$WORKDIR" --distributed=on "${OVERRIDES[@]}")"
LOG="~/calm_logs/$RUN_NAME.\$(hostname).log"
if [[ "${DETACH:-0}" == 1 ]]; then
  on_all_workers "mkdir -p ~/calm_logs && cd ~/$REMOTE_DIR && nohup $TRAIN > $LOG 2>&1 < /dev/null &"
else
  on_all_workers "set -o pipefail; mkdir -p ~/calm_logs && cd ~/$REMOTE_DIR && $TRAIN 2>&1 | tee $LOG"
fi
