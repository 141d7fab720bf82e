# Helpers shared by the launch scripts (sourced, never run): --dry-run, required variables, commands.
#
# A script sets SCRIPT_USAGE, sources this file and calls parse_args "$@"; then
# POSITIONAL holds its arguments without --dry-run/--help, and run_cmd prints
# each external command ("+ cmd ...") and runs it unless --dry-run was given.

DRY_RUN=0
POSITIONAL=()

die() {  # message... -> "error: message" on stderr, exit 2
  echo "error: $*" >&2
  exit 2
}

print_help() {  # the script's header comment, up to `set -euo pipefail`
  sed -n '2,/^set -euo pipefail/p' "$1" | sed '$d' | sed 's/^# \{0,1\}//'
}

parse_args() {  # "$@" of the script -> DRY_RUN, POSITIONAL
  local arg
  for arg in "$@"; do
    case "$arg" in
      --dry-run) DRY_RUN=1 ;;
      -h|--help) print_help "$SCRIPT_PATH"; exit 0 ;;
      *) POSITIONAL+=("$arg") ;;
    esac
  done
}

require_args() {  # count names... : at least `count` positional arguments
  local count="$1"
  shift
  if [[ ${#POSITIONAL[@]} -lt $count ]]; then
    echo "error: missing arguments: $* required." >&2
    echo "usage: $SCRIPT_USAGE" >&2
    echo "Run with --help for the full description and a worked example." >&2
    exit 2
  fi
}

require_vars() {  # NAME=example ... : every NAME must be set and non-empty
  local pair missing=() examples=()
  for pair in "$@"; do
    local name="${pair%%=*}"
    if [[ -z "${!name:-}" ]]; then
      missing+=("$name")
      examples+=("$pair")
    fi
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    local names="${missing[*]}"
    echo "error: missing required variable(s): ${names// /, }." >&2
    echo "Set them in the environment, e.g.: ${examples[*]} $SCRIPT_USAGE" >&2
    echo "(see the header of $SCRIPT_PATH for what each one means)" >&2
    exit 2
  fi
}

require_positive_int() {  # NAME : the variable NAME must hold a positive integer
  [[ "${!1}" =~ ^[1-9][0-9]*$ ]] || die "$1='${!1}' must be a positive integer."
}

require_tool() {  # tool fix : the tool must be on PATH unless --dry-run
  if [[ $DRY_RUN -eq 0 ]] && ! command -v "$1" > /dev/null 2>&1; then
    die "'$1' not found on PATH: $2 (or use --dry-run to print the plan)."
  fi
}

quote() {  # words... -> one command line, words single-quoted where the shell needs it (~/ kept)
  local out="" word
  local safe='^[A-Za-z0-9_./:=,@+%^-]+$' home='^~/[A-Za-z0-9_./-]*$'
  for word in "$@"; do
    if [[ "$word" =~ $safe || "$word" =~ $home ]]; then
      out+="$word "
    else
      out+="'${word//\'/\'\\\'\'}' "
    fi
  done
  echo "${out% }"
}

run_cmd() {  # command words... : print it, then run it unless --dry-run
  echo "+ $(quote "$@")"
  if [[ $DRY_RUN -eq 0 ]]; then
    "$@"
  fi
}
