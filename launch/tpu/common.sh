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
