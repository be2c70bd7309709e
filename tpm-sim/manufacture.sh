#!/usr/bin/env bash
# Manufacture a software TPM: EK (RSA-2048 + ECC P-384) with certificates and
# a platform certificate, all signed by a local CA that plays the "TPM vendor".
# Several TPMs manufactured with the same --ca share one root, like real parts
# from one vendor.
set -euo pipefail

usage() { echo "usage: $0 --ca CA_DIR --state TPM_DIR" >&2; exit 2; }
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

ca="" state=""
while [ $# -gt 0 ]; do
  case "$1" in
    --ca) [ $# -ge 2 ] || usage; ca=$2; shift 2 ;;
    --state) [ $# -ge 2 ] || usage; state=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "$0: unknown argument: $1" >&2; usage ;;
  esac
done
[ -n "$ca" ] && [ -n "$state" ] || usage
command -v swtpm_setup >/dev/null || die "swtpm_setup not found (install swtpm-tools)"

mkdir -p "$ca" "$state"
ca=$(cd "$ca" && pwd) state=$(cd "$state" && pwd)

# Our own config files, so nothing under /etc or /var/lib is read or written.
# Only written when absent: an existing CA keeps its configuration.
[ -f "$ca/localca.conf" ] || cat > "$ca/localca.conf" <<CONF
statedir = $ca
signingkey = $ca/signkey.pem
issuercert = $ca/issuercert.pem
certserial = $ca/certserial
CONF
[ -f "$ca/localca.options" ] || cat > "$ca/localca.options" <<CONF
--platform-manufacturer attestd-sim
--platform-version 1.0
--platform-model swtpm
CONF
[ -f "$ca/swtpm_setup.conf" ] || cat > "$ca/swtpm_setup.conf" <<CONF
create_certs_tool = /usr/bin/swtpm_localca
create_certs_tool_config = $ca/localca.conf
create_certs_tool_options = $ca/localca.options
active_pcr_banks = sha256,sha1
CONF

log="$state/manufacture.log"
if ! swtpm_setup --tpm2 --tpmstate "$state" --config "$ca/swtpm_setup.conf" \
    --create-ek-cert --create-platform-cert --overwrite >"$log" 2>&1; then
  cat "$log" >&2
  die "swtpm_setup failed for $state (log: $log)"
fi

root="$ca/swtpm-localca-rootca-cert.pem"
[ -f "$root" ] && [ -f "$ca/issuercert.pem" ] || die "CA certificates missing in $ca"
echo "$root"
