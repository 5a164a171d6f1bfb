#!/usr/bin/env bash
# Create a Cloud TPU VM slice: by default a queued resource (waits in line until capacity frees up).
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<HELP
Usage: launch/tpu/create.sh --name NAME --zone ZONE --accelerator TYPE [--spot | --preemptible]

Asks for a TPU VM slice. The default is a queued resource: the request waits until the slice can
be provisioned; watch it with status.sh until its state is ACTIVE, then run setup.sh. If the
queued resource (with --direct: the TPU VM) already exists, it prints its state and creates
nothing, so running it again is safe (it fails on one that will not come up, e.g. FAILED:
delete.sh it first); --dry-run prints that check, then the create command.

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
  kind="TPU VM"
  describe=(gcloud compute tpus tpu-vm describe "$OPT_name" "${GCLOUD_FLAGS[@]}"
    --format="value(state)" --quiet)
  cmd=(gcloud compute tpus tpu-vm create "$OPT_name" "${GCLOUD_FLAGS[@]}"
    --accelerator-type="$accelerator" --version="$version")
  ((!OPT_preemptible)) || cmd+=(--preemptible)
else
  ((!OPT_preemptible)) ||
    die "--preemptible needs --direct: queued resources offer --spot instead"
  kind="queued resource"
  describe=(gcloud compute tpus queued-resources describe "$OPT_name" "${GCLOUD_FLAGS[@]}"
    --format="value(state.state)" --quiet)
  cmd=(gcloud compute tpus queued-resources create "$OPT_name" --node-id="$OPT_name"
    "${GCLOUD_FLAGS[@]}" --accelerator-type="$accelerator" --runtime-version="$version")
fi
((!OPT_spot)) || cmd+=(--spot)
((!OPT_reserved)) || cmd+=(--reserved)
cmd+=("${CREATE_EXTRA[@]}")

# Create only what does not exist yet: a rerun (after a partial failure, or to be sure) reports the
# existing one. describe fails with "NOT_FOUND: Resource '...' was not found" when there is none;
# any other failure (auth, API, network) stops here, before creating anything. --quiet: no prompt
# (e.g. to enable the API) hidden behind the captured output.
if ((DRY_RUN)); then
  run "${describe[@]}"
  echo "# then, only if that finds no $kind $OPT_name:"
else
  errors=$(mktemp)
  trap 'rm -f "$errors"' EXIT
  printf '+ %s\n' "$(command_line "${describe[@]}")" >&2
  if state=$("${describe[@]}" 2>"$errors"); then
    case $state in
      FAILED | SUSPENDING | SUSPENDED | DELETING | PREEMPTED | TERMINATED)
        delete="delete.sh"
        ((!OPT_direct)) || delete+=" --direct"
        die "the $kind $OPT_name exists in state $state and will not come up: $delete," \
          "then create.sh again"
        ;;
    esac
    echo "the $kind $OPT_name already exists (state: ${state:-unknown}): nothing to create"
    exit 0
  fi
  if ! grep -q NOT_FOUND "$errors"; then
    cat "$errors" >&2
    die "could not tell whether the $kind $OPT_name exists (see above): nothing was created"
  fi
fi
run "${cmd[@]}"
