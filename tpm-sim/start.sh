#!/usr/bin/env bash
# Start a manufactured software TPM on 127.0.0.1: TPM commands on PORT,
# control channel (swtpm_ioctl) on PORT+1. Prints the TCTI string.
set -euo pipefail

usage() { echo "usage: $0 --state TPM_DIR --port PORT" >&2; exit 2; }
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

state="" port=""
while [ $# -gt 0 ]; do
  case "$1" in
    --state) [ $# -ge 2 ] || usage; state=$2; shift 2 ;;
    --port) [ $# -ge 2 ] || usage; port=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "$0: unknown argument: $1" >&2; usage ;;
  esac
done
[ -n "$state" ] && [ -n "$port" ] || usage
state=$(realpath -m -- "$state")  # swtpm needs absolute paths
[[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65534 ] \
  || die "port must be 1..65534 (PORT+1 is the control port): $port"
[ -d "$state" ] || die "no TPM state directory: $state (run manufacture.sh first)"
[ -f "$state/tpm2-00.permall" ] || die "$state holds no manufactured TPM (run manufacture.sh first)"

pidfile="$state/swtpm.pid"
if swtpm_running "$pidfile"; then
  die "already running (pid $(cat "$pidfile")); stop it first"
fi
rm -f "$pidfile"

# not-need-init + startup-clear: the TPM is usable at once, like after firmware
# has run TPM2_Startup on a real machine.
swtpm socket --tpm2 --tpmstate dir="$state" \
  --server type=tcp,port="$port",bindaddr=127.0.0.1 \
  --ctrl type=tcp,port=$((port + 1)),bindaddr=127.0.0.1 \
  --flags not-need-init,startup-clear \
  --log file="$state/swtpm.log" \
  --daemon --pid file="$pidfile" \
  || die "swtpm failed to start (ports $port/$((port + 1)) in use?); see $state/swtpm.log"
echo "$port" > "$state/port"

tcti="swtpm:host=127.0.0.1,port=$port"
# Bounded wait: --daemon returns once listening, but make sure commands work.
for _ in $(seq 50); do
  if TSS2_LOG=all+none tpm2_getcap -T "$tcti" properties-fixed >/dev/null 2>&1; then
    echo "$tcti"
    exit 0
  fi
  sleep 0.1
done
# Do not leave a half-working swtpm behind.
"$(dirname "$0")/stop.sh" --state "$state" || true
die "TPM on port $port did not answer within 5 s; see $state/swtpm.log"
