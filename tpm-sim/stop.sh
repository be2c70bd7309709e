#!/usr/bin/env bash
# Stop a software TPM started by start.sh. Safe to call when it is not running.
set -euo pipefail

usage() { echo "usage: $0 --state TPM_DIR" >&2; exit 2; }
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

parse_state_only "$@"

pidfile="$state/swtpm.pid"
# Not running (or a stale pid file): nothing to do.
swtpm_running "$pidfile" || { rm -f "$pidfile"; exit 0; }
pid=$(cat "$pidfile")

wait_gone() {  # $1 = tenths of a second
  for _ in $(seq "$1"); do swtpm_running "$pidfile" || return 0; sleep 0.1; done
  ! swtpm_running "$pidfile"
}

# Graceful shutdown first, as an orderly power-down would do it: TPM2_Shutdown(CLEAR)
# (so the next quote's clockInfo.safe stays 1), then swtpm writes its state out.
if [ -f "$state/port" ]; then
  TSS2_LOG=${TSS2_LOG:-all+none} tpm2_shutdown -c -T "swtpm:host=127.0.0.1,port=$(cat "$state/port")" \
    >/dev/null 2>&1 || true
  swtpm_ioctl --tcp "127.0.0.1:$(( $(cat "$state/port") + 1 ))" -s >/dev/null 2>&1 || true
fi
wait_gone 30 || { kill -TERM "$pid" 2>/dev/null || true; wait_gone 30; } \
  || { kill -KILL "$pid" 2>/dev/null || true; wait_gone 20; } \
  || die "swtpm (pid $pid) would not stop"
rm -f "$pidfile"
