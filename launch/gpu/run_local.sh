#!/usr/bin/env bash
# Train on one host with one or more GPUs: a single process drives all of them (no coordinator).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
# shellcheck source=launch/gpu/xla_flags.sh
source "$(dirname "${BASH_SOURCE[0]}")/xla_flags.sh"

usage() {
  cat <<HELP
Usage: launch/gpu/run_local.sh --config CONFIG --workdir DIR [--setup] [options] [-- ARGS]

Runs 'python -m catflax.main --config=CONFIG --workdir=DIR [ARGS]' in one process that sees every
GPU of this host (select some with --gpus), with the XLA settings of launch/gpu/xla_flags.sh.
--setup first makes the virtual environment: requirements.txt, requirements-gcs.txt (gs:// paths),
jax[cuda12] of the pinned jax version and the project (-e .). Python 3.11 or newer is needed.

  --config CONFIG      config file, e.g. configs/coco.py
  --workdir DIR        local directory or gs:// path for checkpoints and logs (relative paths
                       are the caller's; --config is looked up there, then in the project)
  --setup              create/refresh the virtual environment first
  --setup-only         only that: no --config/--workdir needed, nothing is run
  --venv DIR           virtual environment (default .venv-cuda in the project)
  --python PYTHON      interpreter that makes the venv (default python3)
  --cuda 12|13         CUDA major version of the jax wheels (default 12)
  --gpus LIST          CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3 (default: all)
  --mem-fraction F     XLA_PYTHON_CLIENT_MEM_FRACTION (default: the environment's, else
                       $GPU_MEM_FRACTION)
  --xla-flags FLAGS    more XLA flags, after the defaults ($GPU_XLA_FLAGS)
                       and the environment's XLA_FLAGS
  --dry-run            print the exact commands, run nothing
  -h, --help           this help
  -- ARGS             passed on to catflax.main, e.g. -- --config.seed=3
HELP
}

OPT_config="" OPT_workdir="" OPT_setup=0 OPT_setup_only=0 OPT_venv="$CATFLAX_ROOT/.venv-cuda" OPT_python=python3
OPT_cuda=12 OPT_gpus="" OPT_mem_fraction=${XLA_PYTHON_CLIENT_MEM_FRACTION:-$GPU_MEM_FRACTION}
OPT_xla_flags=""
VALUE_OPTS+=(config workdir venv python cuda gpus mem-fraction xla-flags)
FLAG_OPTS+=(setup setup-only)
parse_args "$@"
((OPT_setup_only)) || require config workdir
check_main_args
[[ $OPT_cuda == 12 || $OPT_cuda == 13 ]] || die "--cuda is 12 or 13, not '$OPT_cuda'"

absolute_paths
cd "$CATFLAX_ROOT"
if ((OPT_setup || OPT_setup_only)); then
  "$OPT_python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
    die "--python $OPT_python: Python 3.11 or newer is needed (see --help)"
  jax_version=$(pinned_version jax)
  run "$OPT_python" -m venv "$OPT_venv"
  run "$OPT_venv/bin/pip" install --quiet -r requirements.txt -r requirements-gcs.txt \
    "jax[cuda$OPT_cuda]==$jax_version" -e .
fi
((!OPT_setup_only)) || exit 0
[[ -n $OPT_gpus ]] && set_env CUDA_VISIBLE_DEVICES "$OPT_gpus"
# The environment's XLA_FLAGS after the defaults: XLA keeps the last value of a repeated flag.
set_env XLA_FLAGS "$GPU_XLA_FLAGS${XLA_FLAGS:+ $XLA_FLAGS}${OPT_xla_flags:+ $OPT_xla_flags}"
set_env XLA_PYTHON_CLIENT_MEM_FRACTION "$OPT_mem_fraction"
# One process, even inside a SLURM allocation with several tasks (whose SLURM_* variables would
# otherwise make catflax.distributed wait for the other tasks).
set_env JAX_COORDINATOR_ADDRESS localhost:0
set_env JAX_NUM_PROCESSES 1
set_env JAX_PROCESS_ID 0
[[ -x $OPT_venv/bin/python ]] || ((DRY_RUN)) ||
  die "no virtual environment at $OPT_venv: make it with --setup (see --help)"
run_exec "$OPT_venv/bin/python" -m catflax.main --config="$OPT_config" \
  --workdir="$OPT_workdir" "${EXTRA_ARGS[@]}"
