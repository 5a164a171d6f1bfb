#!/usr/bin/env bash
# Describe a TPU slice: the queued resource's state (WAITING_FOR_RESOURCES, ACTIVE, ...) or the VM.
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<HELP
Usage: launch/tpu/status.sh --name NAME --zone ZONE [--direct]

Describes the queued resource (its state.state turns ACTIVE once the slice is up) or, with
--direct, the TPU VM itself.

$DIRECT_HELP
$TARGET_HELP
HELP
}

FLAG_OPTS+=(direct)
parse_args "$@"
no_extra_args
gcloud_flags
if ((OPT_direct)); then
  run gcloud compute tpus tpu-vm describe "$OPT_name" "${GCLOUD_FLAGS[@]}"
else
  run gcloud compute tpus queued-resources describe "$OPT_name" "${GCLOUD_FLAGS[@]}"
fi
