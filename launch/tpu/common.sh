# shellcheck shell=bash disable=SC2034  # SC2034: the scripts that source this use these
# Shared by the Cloud TPU scripts: the slice's --name/--zone/--project, accelerator types, gcloud.
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

# Where things live on every worker, relative to the login user's home directory.
REMOTE_SRC=catflax          # the project (copied or cloned by setup.sh)
REMOTE_VENV=catflax-venv    # its Python 3.11 virtual environment
REMOTE_WEIGHTS=catflax-weights  # pretrained weights copied from GCS (setup.sh --weights)
REMOTE_LOG=catflax-run.log  # stdout+stderr of the run on that worker
REMOTE_PID=catflax-run.pid  # process (group) id of the run on that worker
REMOTE_STATUS=catflax-run.status  # the run's exit status, written when it ends
UV_VERSION=0.13.9           # uv makes the Python 3.11 venv (the TPU images ship Python 3.10)

OPT_name=${CATFLAX_TPU_NAME:-}
OPT_zone=${CATFLAX_TPU_ZONE:-}
OPT_project=${CATFLAX_TPU_PROJECT:-}
OPT_direct=0
VALUE_OPTS=(name zone project)

TARGET_HELP="  --name NAME        the TPU VM (and its queued resource)          [\$CATFLAX_TPU_NAME]
  --zone ZONE        a zone that has the accelerator type          [\$CATFLAX_TPU_ZONE]
  --project PROJECT  Google Cloud project (default: gcloud's own)  [\$CATFLAX_TPU_PROJECT]
  --dry-run          print the exact commands, run nothing
  -h, --help         this help"

DIRECT_HELP="  --direct           the slice was made with 'create.sh --direct' (tpu-vm create), not as
                     a queued resource"

# gcloud_flags: --zone and --project for every gcloud call (after parse_args).
gcloud_flags() {
  [[ -n $OPT_name ]] || die "--name is required (or CATFLAX_TPU_NAME; see --help)"
  [[ -n $OPT_zone ]] || die "--zone is required (or CATFLAX_TPU_ZONE; see --help)"
  if ((!DRY_RUN)) && ! command -v gcloud >/dev/null; then
    die "gcloud not found: install the Google Cloud CLI" \
      "(https://cloud.google.com/sdk/docs/install), then run 'gcloud auth login'"
  fi
  GCLOUD_FLAGS=(--zone="$OPT_zone")
  [[ -z $OPT_project ]] || GCLOUD_FLAGS+=(--project="$OPT_project")
  # More gcloud flags, split on spaces: CATFLAX_SSH_FLAGS for tpu-vm ssh/scp (e.g.
  # --internal-ip or --tunnel-through-iap), CATFLAX_CREATE_FLAGS for creating the slice (e.g.
  # --internal-ips --network=NET --subnetwork=SUB --service-account=SA).
  read -ra SSH_EXTRA <<<"${CATFLAX_SSH_FLAGS:-}"
  read -ra CREATE_EXTRA <<<"${CATFLAX_CREATE_FLAGS:-}"
}

# tpu_ssh WORKER COMMAND: run COMMAND on one worker (0, 1, ...) or on all of them at once.
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$OPT_name" "${GCLOUD_FLAGS[@]}" "${SSH_EXTRA[@]}" \
    --worker="$1" --command="$2"
}

# live_run_guard [REDIRECT]: a worker snippet that fails (exit 1) with "$BUSY HOST: ..." where
# the worker's pid file names a live process.
BUSY="catflax already runs on"
live_run_guard() {
  printf '%s' "if [ -e ~/$REMOTE_PID ] && kill -0 \"\$(cat ~/$REMOTE_PID)\" 2>/dev/null; then"
  printf '%s' " echo \"$BUSY \$(hostname): stop.sh first\"${1:-}; exit 1; fi"
}

# check_no_live_run WHAT: runs live_run_guard on every worker and dies, saying nothing was WHAT
# (started, set up), if a catflax run is alive on any of them (or a worker could not be checked).
# Does `tpu-vm ssh --worker=all` fail when the command fails on one worker? In current gcloud, yes:
# AttemptRunWithRetries records each worker's exit status (255 where ssh itself failed) and
# WaitForBatchCompletion, once every worker is done, exits with the first non-zero one (gcloud's
# lib/googlecloudsdk/command_lib/compute/tpus/tpu_vm/ssh.py, as mirrored in
# github.com/google-cloud-sdk-unofficial/google-cloud-sdk). Older releases (_AttemptSSHWithRetries,
# no exit_statuses) called sys.exit in each worker's thread only, so gcloud exited 0 whatever the
# workers did. Hence both: the workers' output is searched for the guard's message, and a non-zero
# exit status without it (a worker that could not be checked) stops too.
check_no_live_run() {
  local check found check_status=0
  check=$(live_run_guard)
  if ((DRY_RUN)); then
    tpu_ssh all "$check"
    return
  fi
  found=$(tpu_ssh all "$check") || check_status=$?
  [[ -z $found ]] || printf '%s\n' "$found"
  if grep -qF "$BUSY" <<<"$found"; then
    die "a catflax run is still alive on some workers (see above): stop.sh first;" \
      "nothing was $1"
  fi
  ((check_status == 0)) ||
    die "could not check every worker for a live run (gcloud exit status $check_status;" \
      "see above): nothing was $1"
}

# accelerator_type TYPE: the gcloud --accelerator-type (v5e-N is spelled v5litepod-N there).
accelerator_type() {
  local type=${1/#v5e-/v5litepod-}
  [[ $type =~ ^(v4|v5litepod|v5p|v6e)-[0-9]+$ ]] ||
    die "unknown accelerator type '$1': use v4-N, v5litepod-N (v5e), v5p-N or v6e-N"
  printf '%s' "$type"
}

# runtime_version TYPE: the TPU software version (gcloud --version / --runtime-version) for JAX.
runtime_version() {
  case $1 in
    v4-*) printf 'tpu-ubuntu2204-base' ;;
    v5litepod-*) printf 'v2-alpha-tpuv5-lite' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    *) die "no runtime version known for '$1'" ;;
  esac
}

# no_extra_args: the script takes nothing after `--`.
no_extra_args() {
  ((${#EXTRA_ARGS[@]} == 0)) || die "unexpected arguments after '--': ${EXTRA_ARGS[*]}"
}
