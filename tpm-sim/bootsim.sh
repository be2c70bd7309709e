#!/usr/bin/env bash
# Thin wrapper around bootsim.py (same arguments, output and exit codes), run
# with $PYTHON (default python3), which needs tpm2-pytss and cryptography.
set -euo pipefail
export TSS2_LOG=${TSS2_LOG:-all+none}
exec "${PYTHON:-python3}" "$(dirname "$0")/bootsim.py" "$@"
