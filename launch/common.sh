# shellcheck shell=bash disable=SC2034  # SC2034: the scripts that source this use these
# Helpers sourced by every launch script: option parsing, --dry-run, quoting, errors.
#
# A script declares VALUE_OPTS (options taking a value), FLAG_OPTS (switches) and LIST_OPTS
# (repeatable options collected into arrays), sets defaults in OPT_<name> (dashes become
# underscores), defines usage(), then calls `parse_args "$@"`. Both `--opt VALUE` and `--opt=VALUE`
# work; words after `--` land in EXTRA_ARGS. `--help` and `--dry-run` are always there.

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "$(basename "$0"): needs bash 4.4 or newer, not $BASH_VERSION (macOS: brew install bash)" >&2
  exit 2
fi
CATFLAX_ROOT=${CATFLAX_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
DRY_RUN=0
EXTRA_ARGS=()
VALUE_OPTS=()
FLAG_OPTS=()
LIST_OPTS=()

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

_in_list() {
  local needle=$1 item
  shift
  for item in "$@"; do [[ $item == "$needle" ]] && return 0; done
  return 1
}

parse_args() {
  local arg key val has_value
  while (($#)); do
    arg=$1
    case $arg in
      --)
        shift
        EXTRA_ARGS=("$@")
        return 0
        ;;
      -h | --help)
        usage
        exit 0
        ;;
      --dry-run)
        DRY_RUN=1
        shift
        continue
        ;;
      --*=*) key=${arg%%=*} val=${arg#*=} has_value=1 ;;
      --*) key=$arg val="" has_value=0 ;;
      *) die "unexpected argument '$arg' (options go before '--'; see --help)" ;;
    esac
    key=${key#--}
    if _in_list "$key" "${VALUE_OPTS[@]}" || _in_list "$key" "${LIST_OPTS[@]}"; then
      if ((!has_value)); then
        (($# >= 2)) || die "--$key needs a value (see --help)"
        val=$2
        shift
      fi
      if _in_list "$key" "${LIST_OPTS[@]}"; then
        local -n _list="OPT_${key//-/_}"
        _list+=("$val")
        unset -n _list
      else
        printf -v "OPT_${key//-/_}" '%s' "$val"
      fi
    elif _in_list "$key" "${FLAG_OPTS[@]}"; then
      ((!has_value)) || die "--$key takes no value"
      printf -v "OPT_${key//-/_}" '%s' 1
    else
      die "unknown option --$key (see --help)"
    fi
    shift
  done
}

# require NAME...: every OPT_<NAME> is non-empty.
require() {
  local name var
  for name in "$@"; do
    var="OPT_${name//-/_}"
    [[ -n ${!var} ]] || die "--$name is required (see --help)"
  done
}

# quote WORD: WORD as one shell word that pastes back unchanged (--flag='value', KEY='value').
quote() {
  local s=$1 safe='^[A-Za-z0-9_./:=,@%+-]+$'
  if [[ $s =~ $safe ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--[A-Za-z0-9_.-]+=|[A-Za-z_][A-Za-z0-9_]*=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    _single_quote "${BASH_REMATCH[2]}"
  else
    _single_quote "$s"
  fi
}

# quote_value WORD: like quote, with no special case for --flag= / KEY= prefixes.
quote_value() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else _single_quote "$1"; fi
}

_single_quote() {
  printf "'%s'" "${1//\'/\'\\\'\'}"
}

# command_line WORD...: the words quoted and joined, ready to paste into a shell.
command_line() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(quote "$word")"; done
  printf '%s' "$out"
}

# run CMD...: with --dry-run print the command; otherwise echo it to stderr and run it.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(command_line "$@")"
  else
    printf '+ %s\n' "$(command_line "$@")" >&2
    "$@"
  fi
}

# run_exec CMD...: like run, but the command replaces this shell, so that signals sent to the
# script (kill, timeout, a container stop) reach the command itself.
run_exec() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(command_line "$@")"
  else
    printf '+ %s\n' "$(command_line "$@")" >&2
    exec "$@"
  fi
}

# absolute PATH: a relative PATH made absolute against the caller's directory (the scripts cd to
# the project); absolute paths and URLs (gs://...) unchanged.
absolute() {
  case $1 in
    /* | *://*) printf '%s' "$1" ;;
    *) printf '%s' "$PWD/$1" ;;
  esac
}

# absolute_paths: --workdir and --venv against the caller's directory, and --config too where
# that file exists there (else it is looked up in the project, e.g. configs/coco.py).
absolute_paths() {
  [[ -n ${OPT_workdir:-} ]] && OPT_workdir=$(absolute "$OPT_workdir")
  [[ -n ${OPT_venv:-} ]] && OPT_venv=$(absolute "$OPT_venv")
  if [[ -n ${OPT_config:-} && -e ${OPT_config%%:*} ]]; then
    OPT_config=$(absolute "$OPT_config")
  fi
  return 0
}

# set_env NAME VALUE: export NAME (printed as an `export` line with --dry-run).
set_env() {
  if ((DRY_RUN)); then
    printf 'export %s=%s\n' "$1" "$(quote_value "$2")"
  else
    printf '+ export %s=%s\n' "$1" "$(quote_value "$2")" >&2
  fi
  export "$1=$2"
}

# pinned_version PACKAGE: the version requirements.txt pins (PACKAGE==X), e.g. jax -> 0.10.2.
pinned_version() {
  local line
  line=$(grep -E "^$1==" "$CATFLAX_ROOT/requirements.txt" | head -n 1)
  [[ -n $line ]] || die "requirements.txt pins no version of $1"
  printf '%s' "${line#*==}"
}

# check_main_args: words after `--` go to catflax.main; --config/--workdir come from the options.
check_main_args() {
  local word
  for word in "${EXTRA_ARGS[@]}"; do
    case $word in
      --config=* | --config | --workdir=* | --workdir)
        die "give $word with the script's own --config/--workdir options, not after '--'"
        ;;
    esac
  done
}
