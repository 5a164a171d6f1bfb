#!/usr/bin/env bash
# Create a Cloud TPU VM slice: by default a queued resource (waits in line until capacity frees up).
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<HELP
Usage: launch/tpu/create.sh --name NAME --zone ZONE --accelerator TYPE [--spot | --preemptible]

Asks for a TPU VM slice. The default is a queued resource: the request waits until the slice can
be provisioned; watch it with status.sh until its state is ACTIVE, then run setup.sh.

  --accelerator TYPE      v4-N, v5litepod-N (v5e; v5e-N is accepted), v5p-N or v6e-N,
                          e.g. v4-32, v5litepod-16, v5p-8, v6e-8
  --runtime-version V     TPU software version (default by type: v4 tpu-ubuntu2204-base,
                          v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --spot                  Spot capacity: cheaper, can be preempted at any time
  --preemptible           legacy preemptible TPU (needs --direct: queued resources take --spot)
  --reserved              use the project's reserved capacity
  --direct                'gcloud compute tpus tpu-vm create' (fails at once when there is no
                          capacity) instead of a queued resource
$TARGET_HELP
HELP
}

OPT_accelerator="" OPT_runtime_version="" OPT_spot=0 OPT_preemptible=0 OPT_reserved=0
VALUE_OPTS+=(accelerator runtime-version)
FLAG_OPTS+=(spot preemptible reserved direct)
parse_args "$@"
no_extra_args
require accelerator
gcloud_flags
accelerator=$(accelerator_type "$OPT_accelerator")
version=${OPT_runtime_version:-$(runtime_version "$accelerator")}
((!(OPT_spot && OPT_preemptible))) || die "--spot and --preemptible exclude each other"

if ((OPT_direct)); then
  cmd=(gcloud compute tpus tpu-vm create "$OPT_name" "${GCLOUD_FLAGS[@]}"
    --accelerator-type="$accelerator" --version="$version")
  ((!OPT_preemptible)) || cmd+=(--preemptible)
else
  ((!OPT_preemptible)) ||
    die "--preemptible needs --direct: queued resources offer --spot instead"
  cmd=(gcloud compute tpus queued-resources create "$OPT_name" --node-id="$OPT_name"
    "${GCLOUD_FLAGS[@]}" --accelerator-type="$accelerator" --runtime-version="$version")
fi
((!OPT_spot)) || cmd+=(--spot)
((!OPT_reserved)) || cmd+=(--reserved)
cmd+=("${CREATE_EXTRA[@]}")
run "${cmd[@]}"
