#!/usr/bin/env bash
# Delete a TPU slice (and its queued resource), ending the billing for it.
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<HELP
Usage: launch/tpu/delete.sh --name NAME --zone ZONE [--direct] [--async]

Deletes the queued resource together with its TPU VMs (--force), without asking. Whatever is
only on the workers' disks is lost: the workdir on GCS stays.

  --async            return at once instead of waiting for the deletion
$DIRECT_HELP
$TARGET_HELP
HELP
}

OPT_async=0
FLAG_OPTS+=(direct async)
parse_args "$@"
no_extra_args
gcloud_flags
if ((OPT_direct)); then
  cmd=(gcloud compute tpus tpu-vm delete "$OPT_name" "${GCLOUD_FLAGS[@]}" --quiet)
else
  cmd=(gcloud compute tpus queued-resources delete "$OPT_name" "${GCLOUD_FLAGS[@]}" --force --quiet)
fi
((!OPT_async)) || cmd+=(--async)
run "${cmd[@]}"
