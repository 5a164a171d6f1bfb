#!/usr/bin/env bash
# Stop the catflax run on every worker of a TPU slice (the slice itself stays; see delete.sh).
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<HELP
Usage: launch/tpu/stop.sh --name NAME --zone ZONE [--grace SECONDS]

Sends SIGTERM to the process group that run.sh started on each worker, waits up to --grace
seconds for it to end (an asynchronous checkpoint may still be writing), then SIGKILLs what is
left, which frees the TPU chips for the next run.

  --grace SECONDS    how long to wait before SIGKILL (default 60)
$TARGET_HELP
HELP
}

OPT_grace=60
VALUE_OPTS+=(grace)
parse_args "$@"
no_extra_args
gcloud_flags
[[ $OPT_grace =~ ^[0-9]+$ ]] || die "--grace wants a number of seconds, not '$OPT_grace'"
remote="pid=\$(cat ~/$REMOTE_PID 2>/dev/null) || { echo \"no catflax run on \$(hostname)\"; exit 0; }"
remote+="; kill -TERM -\"\$pid\" 2>/dev/null"
remote+="; for _ in \$(seq $OPT_grace); do kill -0 -\"\$pid\" 2>/dev/null || break; sleep 1; done"
remote+="; kill -KILL -\"\$pid\" 2>/dev/null; rm -f ~/$REMOTE_PID"
remote+="; echo \"catflax stopped on \$(hostname)\""
tpu_ssh all "$remote"
