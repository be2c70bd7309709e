#!/usr/bin/env bash
# Peers for the benchmarks, each in its own environment, never in attestd's:
# Keylime from PyPI in build/peers-venv (or $1), for bench/quote.py.
#
# Keylime's wheel declares no dependencies (it expects its distribution's
# packages), so the two that keylime.tpm.tpm_util imports are installed beside
# it: cryptography, at the version attestd's own environment uses (so the crypto
# floor is the same library on both sides), and PyYAML (keylime.config).
# Prints the environment's python on success.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$here/build/peers-venv}
python=${PYTHON:-python3}
# The newest release when this was written; it installs and imports on Python 3.11.
keylime=${KEYLIME_VERSION:-7.14.3}
# cryptography as in the calling environment (attestd's), else the newest.
crypto=${CRYPTOGRAPHY_VERSION:-$("$python" -c 'import cryptography; print(cryptography.__version__)' 2>/dev/null || true)}

if ! "$venv/bin/python" -c 'import keylime.tpm.tpm_util' >/dev/null 2>&1; then
  mkdir -p "$(dirname "$venv")"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    "keylime==$keylime" "cryptography${crypto:+==$crypto}" PyYAML >&2
  "$venv/bin/python" -c 'import keylime.tpm.tpm_util' >/dev/null 2>&1 \
    || { echo "$0: keylime.tpm.tpm_util does not import in $venv" >&2; exit 1; }
fi
echo "$venv/bin/python"
