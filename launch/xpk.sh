#!/usr/bin/env bash
# Runs calm-train as an xpk workload on a GKE TPU cluster, one or several slices (multi-slice).
#
# Usage:
#   [VARIABLES=...] launch/xpk.sh [--dry-run] CONFIG WORKDIR [overrides...]
#
# Submits `xpk workload create` with the container command
#   [pip install -e . &&] calm-train --config CONFIG --workdir WORKDIR --distributed=on \
#     [--config.mesh.dcn_data=NUM_SLICES] [overrides...]
# on every VM of NUM_SLICES slices of TPU_TYPE. JAX finds its peers (and the slices,
# over DCN via the MEGASCALE_* variables xpk sets) by itself. With NUM_SLICES > 1 the
# data axis is split across slices (config.mesh.dcn_data=NUM_SLICES; an explicit
# override later on the command line wins). --dry-run prints the xpk command and runs
# nothing. Logs: `kubectl logs` per pod, or the Cloud Logging link xpk prints.
#
# The container needs the code: either DOCKER_IMAGE, an image with calm_jax installed
# (pip install -e . 'jax[tpu]'), or BASE_IMAGE, a JAX TPU image (e.g.
# us-docker.pkg.dev/cloud-tpu-images/jax-ai-image/tpu:latest) on which xpk layers this
# checkout (--script-dir); the command then installs it first. WORKDIR, the data and
# the tokenizer must be paths every VM sees (e.g. a gcsfuse/Filestore volume attached
# with xpk's --storage, passed in EXTRA_XPK_ARGS).
#
# Required variables:
#   CLUSTER        the xpk/GKE cluster (xpk cluster create ...)
#   WORKLOAD       workload name (lowercase letters, digits and '-')
#   TPU_TYPE       slice type, e.g. v5p-64, v5litepod-256, v6e-256
#   NUM_SLICES     number of slices (1 = single slice)
#   PROJECT        the Google Cloud project id
#   ZONE           e.g. us-east5-a
#   DOCKER_IMAGE or BASE_IMAGE (exactly one, see above)
# Optional variables:
#   PRIORITY       xpk priority (default medium)
#   MAX_RESTARTS   restarts of the whole workload after a failure (default 0); calm-train
#                  resumes from the latest checkpoint in WORKDIR
#   EXTRA_XPK_ARGS more xpk arguments, split on spaces (e.g. '--storage=calm-fs --spot')
#   XPK            the xpk command (default xpk)
#
# Worked example: CALM-M on two v5p-64 slices (2 x 32 chips; mesh=2xv5p-64: dcn_data=2 across
# slices, data=4 x fsdp=8 inside each):
#   CLUSTER=calm-cluster WORKLOAD=calm-m-2x64 TPU_TYPE=v5p-64 NUM_SLICES=2 \
#   PROJECT=my-project ZONE=us-east5-a \
#   BASE_IMAGE=us-docker.pkg.dev/cloud-tpu-images/jax-ai-image/tpu:latest \
#   EXTRA_XPK_ARGS='--storage=calm-fs' \
#   launch/xpk.sh experiments/calm.py:size=M,mesh=2xv5p-64 /shared/runs/calm_m \
#     --config.autoencoder.workdir=/shared/runs/ae_base
set -euo pipefail

SCRIPT_PATH="${BASH_SOURCE[0]}"
SCRIPT_USAGE="launch/xpk.sh [--dry-run] CONFIG WORKDIR [overrides...]"
source "$(dirname "$SCRIPT_PATH")/lib.sh"
parse_args "$@"
require_args 2 CONFIG WORKDIR
require_vars CLUSTER=calm-cluster WORKLOAD=calm-m TPU_TYPE=v5p-64 NUM_SLICES=2 \
  PROJECT=my-project ZONE=us-east5-a
if [[ -n "${DOCKER_IMAGE:-}" && -n "${BASE_IMAGE:-}" ]]; then
  die "both DOCKER_IMAGE and BASE_IMAGE are set; set exactly one (see the header of $SCRIPT_PATH)."
fi
if [[ -z "${DOCKER_IMAGE:-}" && -z "${BASE_IMAGE:-}" ]]; then
  die "missing required variable: DOCKER_IMAGE (an image with calm_jax installed) or BASE_IMAGE" \
    "(e.g. BASE_IMAGE=us-docker.pkg.dev/cloud-tpu-images/jax-ai-image/tpu:latest)."
fi
require_positive_int NUM_SLICES
read -r -a XPK_CMD <<< "${XPK:-xpk}"
require_tool "${XPK_CMD[0]}" "install xpk (pip install xpk) and its gcloud/kubectl prerequisites"
CONFIG="${POSITIONAL[0]}"
WORKDIR="${POSITIONAL[1]}"
OVERRIDES=("${POSITIONAL[@]:2}")

TRAIN=(calm-train --config "$CONFIG" --workdir "$WORKDIR" --distributed=on)
if [[ $NUM_SLICES -gt 1 ]]; then
  TRAIN+=("--config.mesh.dcn_data=$NUM_SLICES")
fi
TRAIN+=("${OVERRIDES[@]}")
COMMAND="$(quote "${TRAIN[@]}")"
IMAGE_ARGS=()
if [[ -n "${BASE_IMAGE:-}" ]]; then
  REPO_ROOT="$(cd "$(dirname "$SCRIPT_PATH")/.." && pwd)"
  IMAGE_ARGS=(--base-docker-image="$BASE_IMAGE" --script-dir="$REPO_ROOT")
  COMMAND="pip install --quiet -e . && $COMMAND"
else
  IMAGE_ARGS=(--docker-image="$DOCKER_IMAGE")
fi
read -r -a EXTRA <<< "${EXTRA_XPK_ARGS:-}"

echo "Plan: xpk workload '$WORKLOAD' on $NUM_SLICES x $TPU_TYPE in cluster '$CLUSTER' ($PROJECT, $ZONE)"
run_cmd "${XPK_CMD[@]}" workload create --cluster="$CLUSTER" --workload="$WORKLOAD" \
  --tpu-type="$TPU_TYPE" --num-slices="$NUM_SLICES" --project="$PROJECT" --zone="$ZONE" \
  --priority="${PRIORITY:-medium}" --max-restarts="${MAX_RESTARTS:-0}" "${IMAGE_ARGS[@]}" \
  "${EXTRA[@]}" --command="$COMMAND"
if [[ $DRY_RUN -eq 0 ]]; then
  echo "Submitted. Follow it with: $(quote "${XPK_CMD[@]}" workload list --cluster="$CLUSTER" \
    --project="$PROJECT" --zone="$ZONE") (and kubectl logs for each pod)."
fi
