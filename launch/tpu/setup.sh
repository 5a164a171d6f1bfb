#!/usr/bin/env bash
# Install catflax on every worker of a TPU slice: the code, a Python 3.11 venv, jax[tpu], -e .
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<HELP
Usage: launch/tpu/setup.sh --name NAME --zone ZONE [--repo URL [--ref REF]] [--weights gs://...]

Puts the project in ~/$REMOTE_SRC on every worker (by default the files of this working tree that
git lists, tracked or new and not ignored; with --repo a git clone), makes ~/$REMOTE_VENV with Python
$PYTHON_VERSION (uv $UV_VERSION fetches it) and installs requirements.txt, requirements-gcs.txt
(gs:// support), jax[tpu] of the version requirements.txt pins, and the project itself (-e .).
Safe to run again after code changes; it checks every worker first and changes nothing while a
run is alive on any of them (stop.sh first).

  --repo URL         clone this git repository on the workers instead of copying this tree
  --weights gs://... copy this GCS folder to ~/$REMOTE_WEIGHTS on every worker (gcloud storage
                     rsync; catflax reads weights from local disk), e.g. gs://BUCKET/weights
                     holding clip-vit-large-patch14/; configs then name
                     ../$REMOTE_WEIGHTS/clip-vit-large-patch14 (runs start in ~/$REMOTE_SRC)
  --ref REF          branch, tag or commit to check out (with --repo)
$TARGET_HELP
HELP
}

PYTHON_VERSION=3.11
OPT_repo="" OPT_ref="" OPT_weights=""
VALUE_OPTS+=(repo ref weights)
parse_args "$@"
no_extra_args
gcloud_flags
[[ -z $OPT_ref || -n $OPT_repo ]] || die "--ref needs --repo"
[[ -z $OPT_weights || $OPT_weights == gs://?* ]] || die "--weights wants a gs:// folder"
jax_version=$(pinned_version jax)
# Every worker first: replacing the code under a live run on some workers, or on the others of a
# run still alive on some, leaves the slice half old, half new.
check_no_live_run "set up"

if [[ -n $OPT_repo ]]; then
  fetch="rm -rf $REMOTE_SRC && git clone --quiet $(quote "$OPT_repo") $REMOTE_SRC"
  [[ -z $OPT_ref ]] || fetch+=" && git -C $REMOTE_SRC checkout --quiet $(quote "$OPT_ref")"
else
  tarball="${TMPDIR:-/tmp}/catflax-src-$OPT_name.tar.gz"
  if git -C "$CATFLAX_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # The project's files, tracked or new, that git does not ignore: no workdirs, weights, logs
    # or virtual environments kept in the tree.
    list=(git -C "$CATFLAX_ROOT" ls-files -z --cached --others --exclude-standard)
    # GNU tar skips tracked files deleted since (with a warning); bsdtar (macOS) has no such flag
    skip_missing=()
    if tar --version 2>/dev/null | grep GNU >/dev/null; then skip_missing=(--ignore-failed-read); fi
    pack=(tar --null "${skip_missing[@]}" -czf "$tarball" -C "$CATFLAX_ROOT" -T -)
    if ((DRY_RUN)); then
      printf '%s | %s\n' "$(command_line "${list[@]}")" "$(command_line "${pack[@]}")"
    else
      printf '+ %s | %s\n' "$(command_line "${list[@]}")" "$(command_line "${pack[@]}")" >&2
      "${list[@]}" | "${pack[@]}"
    fi
  else
    run tar -czf "$tarball" -C "$CATFLAX_ROOT" --exclude=./.git --exclude='./.venv*' \
      --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
      --exclude=.ruff_cache .
  fi
  run gcloud compute tpus tpu-vm scp "$tarball" "$OPT_name:catflax-src.tar.gz" \
    "${GCLOUD_FLAGS[@]}" "${SSH_EXTRA[@]}" --worker=all
  fetch="rm -rf $REMOTE_SRC && mkdir $REMOTE_SRC && tar -xzf catflax-src.tar.gz -C $REMOTE_SRC"
fi

# These run in the worker's shell, which expands the tildes.
# shellcheck disable=SC2088
uv='~/.local/bin/uv'
# shellcheck disable=SC2088
steps=(
  "cd ~"
  "if kill -0 \"\$(cat ~/$REMOTE_PID 2>/dev/null)\" 2>/dev/null; then echo \"catflax runs on \$(hostname): stop.sh before setup.sh\" >&2; exit 1; fi"
  "$fetch"
  ${OPT_weights:+"mkdir -p $REMOTE_WEIGHTS"}
  ${OPT_weights:+"gcloud storage rsync --recursive $(quote "$OPT_weights") $REMOTE_WEIGHTS"}
  "python3 -m pip install --user --quiet uv==$UV_VERSION"
  "$uv venv --quiet --allow-existing --python $PYTHON_VERSION $REMOTE_VENV"
  "cd $REMOTE_SRC"
  "$uv pip install --quiet --python ~/$REMOTE_VENV/bin/python -r requirements.txt -r requirements-gcs.txt \"jax[tpu]==$jax_version\" -e ."
  "~/$REMOTE_VENV/bin/python -c \"import catflax, jax; print(jax.__version__)\""
  "echo catflax ready on \$(hostname)"
)
remote=$(printf '%s && ' "${steps[@]}")
tpu_ssh all "${remote% && }"
