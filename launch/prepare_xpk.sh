#!/usr/bin/env bash
# Runs calm-prepare as an xpk workload on CPU nodes of a GKE cluster: node I tokenizes shard I of N.
#
# Usage:
#   [VARIABLES=...] launch/prepare_xpk.sh [--dry-run] SPEC TOKENIZER OUTPUT [flags...]
#
# Submits `xpk workload create --device-type=DEVICE_TYPE --num-nodes=NUM_SHARDS` whose
# container runs, on each of the NUM_SHARDS nodes,
#   calm-prepare --data SPEC --tokenizer TOKENIZER --output OUTPUT --num_shards NUM_SHARDS \
#     --shard_index $JOB_COMPLETION_INDEX [flags...]
# (JOB_COMPLETION_INDEX is the node's index in the indexed Kubernetes job that xpk creates).
# --num_workers defaults to the node's cores. Finished parts leave done-markers, so
# MAX_RESTARTS > 0 (or a resubmission) resumes; the last node to finish writes
# OUTPUT/prepare.json. OUTPUT, the data and the tokenizer must be paths every node sees
# (e.g. a gcsfuse or Filestore volume attached with --storage in EXTRA_XPK_ARGS).
# --dry-run prints the xpk command and runs nothing. The CPU flags follow xpk's
# `workload create --help`; check them against your xpk version.
#
# Required variables:
#   CLUSTER        the xpk/GKE cluster with a CPU node pool
#   WORKLOAD       workload name (lowercase letters, digits and '-')
#   DEVICE_TYPE    CPU machine type as xpk names it, e.g. n2-standard-32-16
#   NUM_SHARDS     number of nodes = shards
#   PROJECT        the Google Cloud project id
#   ZONE           e.g. us-east5-a
#   DOCKER_IMAGE   an image with calm_jax installed (pip install -e .)
# Optional variables:
#   PRIORITY       xpk priority (default medium)
#   MAX_RESTARTS   restarts after a failure (default 2; prepare resumes)
#   EXTRA_XPK_ARGS more xpk arguments, split on spaces (e.g. '--storage=calm-fs')
#   XPK            the xpk command (default xpk)
#
# Worked example: the Pile on 16 CPU nodes:
#   CLUSTER=calm-cpu WORKLOAD=pile-prepare DEVICE_TYPE=n2-standard-32-16 NUM_SHARDS=16 \
#   PROJECT=my-project ZONE=us-east5-a DOCKER_IMAGE=us-docker.pkg.dev/my-project/calm/calm:latest \
#   EXTRA_XPK_ARGS='--storage=calm-fs' \
#   launch/prepare_xpk.sh 'jsonl:/shared/pile/train/*.jsonl.zst' /shared/tok/llama3_tokenizer \
#     /shared/pile_tok
set -euo pipefail

SCRIPT_PATH="${BASH_SOURCE[0]}"
SCRIPT_USAGE="launch/prepare_xpk.sh [--dry-run] SPEC TOKENIZER OUTPUT [flags...]"
source "$(dirname "$SCRIPT_PATH")/lib.sh"
parse_args "$@"
require_args 3 SPEC TOKENIZER OUTPUT
require_vars CLUSTER=calm-cpu WORKLOAD=pile-prepare DEVICE_TYPE=n2-standard-32-16 NUM_SHARDS=16 \
  PROJECT=my-project ZONE=us-east5-a DOCKER_IMAGE=calm:latest
require_positive_int NUM_SHARDS
read -r -a XPK_CMD <<< "${XPK:-xpk}"
require_tool "${XPK_CMD[0]}" "install xpk (pip install xpk) and its gcloud/kubectl prerequisites"
SPEC="${POSITIONAL[0]}"
TOKENIZER="${POSITIONAL[1]}"
OUTPUT="${POSITIONAL[2]}"
FLAGS=("${POSITIONAL[@]:3}")

COMMAND="$(quote calm-prepare --data "$SPEC" --tokenizer "$TOKENIZER" --output "$OUTPUT" \
  --num_shards "$NUM_SHARDS") --shard_index \"\$JOB_COMPLETION_INDEX\""
if [[ ${#FLAGS[@]} -gt 0 ]]; then
  COMMAND+=" $(quote "${FLAGS[@]}")"
fi
read -r -a EXTRA <<< "${EXTRA_XPK_ARGS:-}"

echo "Plan: xpk workload '$WORKLOAD': $NUM_SHARDS x $DEVICE_TYPE nodes in cluster '$CLUSTER' ($PROJECT, $ZONE), one shard each"
run_cmd "${XPK_CMD[@]}" workload create --cluster="$CLUSTER" --workload="$WORKLOAD" \
  --device-type="$DEVICE_TYPE" --num-nodes="$NUM_SHARDS" --project="$PROJECT" --zone="$ZONE" \
  --priority="${PRIORITY:-medium}" --max-restarts="${MAX_RESTARTS:-2}" \
  --docker-image="$DOCKER_IMAGE" "${EXTRA[@]}" --command="$COMMAND"
