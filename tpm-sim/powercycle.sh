#!/usr/bin/env bash
# Simulate a reboot of the machine without stopping swtpm: TPM_Init on the
# control channel, then TPM2_Startup(CLEAR) as firmware would. resetCount
# increments and PCRs return to their reset values; NV and keys survive.
set -euo pipefail

usage() { echo "usage: $0 --state TPM_DIR" >&2; exit 2; }
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

parse_state_only "$@"
[ -f "$state/port" ] && swtpm_running "$state/swtpm.pid" || die "TPM in $state is not running (use start.sh)"
port=$(cat "$state/port")
tcti="swtpm:host=127.0.0.1,port=$port"

# Shut down as an OS would, so this is an orderly reboot (best effort: a
# crashed machine skips it and the startup below is still a TPM reset).
TSS2_LOG=all+none tpm2_shutdown -c -T "$tcti" >/dev/null 2>&1 || true
swtpm_ioctl --tcp "127.0.0.1:$((port + 1))" -i >/dev/null \
  || die "swtpm_ioctl -i failed on control port $((port + 1))"
TSS2_LOG=all+none tpm2_startup -c -T "$tcti" >/dev/null \
  || die "TPM2_Startup(CLEAR) failed"
