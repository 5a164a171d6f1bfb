#!/usr/bin/env bash
# Train on one host with one or more GPUs: a single process drives all of them; or run it on each
# of several hosts with --coordinator/--num-processes/--process-id (no SLURM needed).
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
Several hosts without SLURM: run it on every host with the same --coordinator (the first host and
a free port) and --num-processes (the number of hosts), and --process-id 0 on the first host, 1 on
the next, ... (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), and a --workdir
that every host sees (a shared directory or gs://).
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
  --coordinator HOST:PORT
                       several hosts: the first host (process 0's) and a port free there
  --num-processes N    several hosts: how many processes (one per host) in all
  --process-id I       several hosts: this host's number, 0 to N-1
  --mem-fraction F     XLA_PYTHON_CLIENT_MEM_FRACTION (default: the environment's, else
                       $GPU_MEM_FRACTION)
  --xla-flags FLAGS    more XLA flags, after the defaults ($GPU_XLA_FLAGS)
                       and the environment's XLA_FLAGS
  --dry-run            print the exact commands, run nothing
  -h, --help           this help
  -- ARGS              passed on to catflax.main, e.g. -- --config.seed=3
HELP
}

OPT_config="" OPT_workdir="" OPT_setup=0 OPT_setup_only=0 OPT_venv="$CATFLAX_ROOT/.venv-cuda" OPT_python=python3
OPT_cuda=12 OPT_gpus="" OPT_mem_fraction=${XLA_PYTHON_CLIENT_MEM_FRACTION:-$GPU_MEM_FRACTION}
OPT_xla_flags="" OPT_coordinator=${JAX_COORDINATOR_ADDRESS:-}
OPT_num_processes=${JAX_NUM_PROCESSES:-} OPT_process_id=${JAX_PROCESS_ID:-}
VALUE_OPTS+=(config workdir venv python cuda gpus mem-fraction xla-flags coordinator num-processes
  process-id)
FLAG_OPTS+=(setup setup-only)
parse_args "$@"
((OPT_setup_only)) || require config workdir
check_main_args
[[ $OPT_cuda == 12 || $OPT_cuda == 13 ]] || die "--cuda is 12 or 13, not '$OPT_cuda'"
if ((OPT_setup_only)); then
  :
elif [[ -z $OPT_coordinator$OPT_num_processes$OPT_process_id ]]; then
  # One process. (srun starting this script for each of several tasks would start as many
  # runs, each training alone into the same workdir.)
  if [[ -n ${SLURM_STEP_NODELIST:-} && ${SLURM_NTASKS:-1} != 1 ]]; then
    die "this is one of $SLURM_NTASKS srun tasks, each of which would train alone:" \
      "use launch/gpu/slurm.sbatch (or give --coordinator/--num-processes/--process-id)"
  fi
  OPT_coordinator=localhost:0 OPT_num_processes=1 OPT_process_id=0
else
  for name in coordinator num-processes process-id; do
    var="OPT_${name//-/_}"
    [[ -n ${!var} ]] || die "--coordinator, --num-processes and --process-id go together" \
      "(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID): --$name is missing"
  done
  [[ $OPT_coordinator =~ ^[^[:space:]]+:[0-9]+$ ]] ||
    die "--coordinator wants HOST:PORT, not '$OPT_coordinator'"
  [[ $OPT_num_processes =~ ^[1-9][0-9]*$ ]] ||
    die "--num-processes wants a positive number, not '$OPT_num_processes'"
  if [[ ! $OPT_process_id =~ ^[0-9]+$ ]] || ((10#$OPT_process_id >= OPT_num_processes)); then
    die "--process-id wants a number from 0 to $((OPT_num_processes - 1)), not '$OPT_process_id'"
  fi
fi

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
set_env JAX_COORDINATOR_ADDRESS "$OPT_coordinator"
set_env JAX_NUM_PROCESSES "$OPT_num_processes"
set_env JAX_PROCESS_ID "$OPT_process_id"
[[ -x $OPT_venv/bin/python ]] || ((DRY_RUN)) ||
  die "no virtual environment at $OPT_venv: make it with --setup (see --help)"
run_exec "$OPT_venv/bin/python" -m catflax.main --config="$OPT_config" \
  --workdir="$OPT_workdir" "${EXTRA_ARGS[@]}"
