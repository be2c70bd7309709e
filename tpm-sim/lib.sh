# Helpers shared by the tpm-sim scripts; sourced, not run.

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

# True if the pid file $1 names a live swtpm. A zombie counts as gone: it holds
# no ports, and in containers whose init reaps lazily it lingers for seconds.
# Checking the name guards against a stale pid file whose pid was reused.
swtpm_running() {
  local pid st
  pid=$(cat "$1" 2>/dev/null) && [[ $pid =~ ^[0-9]+$ ]] || return 1
  st=$(ps -o stat=,comm= -p "$pid" 2>/dev/null) || return 1
  [[ $st != Z* && $st == *swtpm ]]
}

# Parse the only argument of stop.sh and powercycle.sh: --state TPM_DIR (sets $state).
parse_state_only() {
  state=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --state) [ $# -ge 2 ] || usage; state=$2; shift 2 ;;
      -h|--help) usage ;;
      *) echo "$0: unknown argument: $1" >&2; usage ;;
    esac
  done
  [ -n "$state" ] || usage
  state=$(realpath -m -- "$state")  # swtpm needs absolute paths
}
