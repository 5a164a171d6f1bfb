#!/usr/bin/env bash
# Start `python -m catflax.main` on every worker of a TPU slice at once (one process per host).
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<HELP
Usage: launch/tpu/run.sh --name NAME --zone ZONE --config CONFIG --workdir gs://BUCKET/DIR
         [--env KEY=VALUE ...] [--foreground] [-- --config.FIELD=VALUE ...]

Runs 'python -m catflax.main --config=CONFIG --workdir=WORKDIR [overrides]' on all workers at
once. The workers find each other by themselves (catflax.distributed). By default the run goes on
in the background (it survives a dropped connection): its output is ~/$REMOTE_LOG on each worker
(logs.sh shows it) and stop.sh ends it. It first checks every worker and starts nothing if a run
is still alive on any of them (stop.sh first): new processes would try to join the old run.

  --config CONFIG      config file, relative to the project root, e.g. configs/coco.py
  --workdir gs://...   where checkpoints and logs go; all workers must see it, so a GCS path
  --env KEY=VALUE      environment variable for the run (repeatable), e.g. LIBTPU_INIT_ARGS=...
  --foreground         then follow every worker's log until the run ends (Ctrl-C stops only
                       the following; stop.sh ends the run), print each worker's exit status
                       (~/$REMOTE_STATUS there) and fail if a worker's run failed
  -- ARGS              passed on to catflax.main, e.g. -- --config.seed=3
$TARGET_HELP
HELP
}

OPT_config="" OPT_workdir="" OPT_foreground=0
OPT_env=()
VALUE_OPTS+=(config workdir)
LIST_OPTS+=(env)
FLAG_OPTS+=(foreground)
parse_args "$@"
require config workdir
gcloud_flags
check_main_args
[[ $OPT_workdir == gs://?* ]] ||
  die "--workdir must be a gs:// path that every worker can reach, not '$OPT_workdir'"

env_words=()
for pair in "${OPT_env[@]}"; do
  [[ $pair =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, not '$pair'"
  env_words+=("$pair")
done
main_line=""
((${#env_words[@]} == 0)) || main_line="env $(command_line "${env_words[@]}") "
# The venv path stays unquoted so that the worker's shell expands the tilde.
# shellcheck disable=SC2088
main_line+="~/$REMOTE_VENV/bin/python $(command_line -m catflax.main --config="$OPT_config" \
  --workdir="$OPT_workdir" "${EXTRA_ARGS[@]}")"

# First check every worker: a worker without a live run would otherwise start a new process that
# tries to join the old run's JAX cluster on the others (it hangs or joins the wrong coordinator).
check_no_live_run "started"

remote="cd ~/$REMOTE_SRC || exit 1"
# The same guard again, for a run started between the check and this start.
remote+="; $(live_run_guard " >&2")"
# The previous run's log is kept as .1 (e.g. the run that crashed and is being restarted).
remote+="; if [ -e ~/$REMOTE_LOG ]; then mv -f ~/$REMOTE_LOG ~/$REMOTE_LOG.1; fi"
# setsid: the run leads its own process group, which stop.sh signals as a whole.
# sh records the run's exit status when it ends. It ignores SIGTERM itself (a trap that runs
# a command; python gets the default handling back) and so lives exactly as long as the run:
# the pid file, tail --pid and the "already runs" guard follow the run, and a run stopped by
# stop.sh or a preemption notice records its own status (0 after its checkpoint).
remote+="; rm -f ~/$REMOTE_STATUS"
run_and_record="trap : TERM; $main_line; echo \$? > ~/$REMOTE_STATUS"
remote+="; setsid nohup sh -c $(quote_value "$run_and_record") > ~/$REMOTE_LOG 2>&1 < /dev/null"
remote+=" & echo \$! > ~/$REMOTE_PID"
remote+="; echo \"catflax started on \$(hostname), pid \$(cat ~/$REMOTE_PID)\""
tpu_ssh all "$remote"
if ((OPT_foreground)); then  # follow the logs until the run ends; Ctrl-C ends only this
  tpu_ssh all "tail -n +1 -F --pid=\"\$(cat ~/$REMOTE_PID)\" ~/$REMOTE_LOG"
  status="s=\$(cat ~/$REMOTE_STATUS 2>/dev/null)"
  status+=" || { echo \"catflax on \$(hostname): no exit status (stopped by a signal?)\" >&2; exit 1; }"
  status+="; echo \"catflax on \$(hostname) exited with \$s\"; exit \"\$s\""
  tpu_ssh all "$status"
fi
