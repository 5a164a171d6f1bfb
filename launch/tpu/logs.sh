#!/usr/bin/env bash
# Show (and follow) the output of the catflax run on a worker of a TPU slice.
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<HELP
Usage: launch/tpu/logs.sh --name NAME --zone ZONE [--worker N|all] [--lines N] [--no-follow]

Prints the last lines of ~/$REMOTE_LOG (what run.sh started) and follows it. Worker 0 is the
main process, the one that writes the training log and sample images.

  --worker N|all     which worker (default 0)
  --lines N          how many lines of history (default 100)
  --no-follow        print and exit
$TARGET_HELP
HELP
}

OPT_worker=0 OPT_lines=100 OPT_no_follow=0
VALUE_OPTS+=(worker lines)
FLAG_OPTS+=(no-follow)
parse_args "$@"
no_extra_args
gcloud_flags
[[ $OPT_worker =~ ^([0-9]+|all)$ ]] || die "--worker wants a number or 'all', not '$OPT_worker'"
[[ $OPT_lines =~ ^[0-9]+$ ]] || die "--lines wants a number, not '$OPT_lines'"
if ((OPT_no_follow)); then
  tpu_ssh "$OPT_worker" "tail -n $OPT_lines ~/$REMOTE_LOG"
else
  tpu_ssh "$OPT_worker" "tail -n $OPT_lines -F ~/$REMOTE_LOG"
fi
