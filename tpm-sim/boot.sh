#!/usr/bin/env bash
# Simulate a measured boot: extend fixed, named stages into PCRs 0-9 of both the
# sha1 and sha256 banks. The digests are hashes of the stage names, so two good
# boots on freshly reset TPMs give identical PCRs. --tamper adds one extra
# "kernel" event to PCR 4 after the normal chain, so only PCR 4 differs.
# Prints one line per event: PCR, sha1, sha256, description (tab-separated).
set -euo pipefail

usage() { echo "usage: $0 --tcti TCTI [--tamper]" >&2; exit 2; }
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

tcti="" tamper=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tcti) [ $# -ge 2 ] || usage; tcti=$2; shift 2 ;;
    --tamper) tamper=1; shift ;;
    -h|--help) usage ;;
    *) echo "$0: unknown argument: $1" >&2; usage ;;
  esac
done
[ -n "$tcti" ] || usage
export TSS2_LOG=${TSS2_LOG:-all+none}

# extend PCR DESCRIPTION: the measured "data" is the description itself.
extend() {
  local pcr=$1 desc=$2 h1 h256
  h1=$(printf '%s' "$desc" | sha1sum | cut -d' ' -f1)
  h256=$(printf '%s' "$desc" | sha256sum | cut -d' ' -f1)
  tpm2_pcrextend -T "$tcti" "$pcr:sha1=$h1,sha256=$h256" \
    || die "tpm2_pcrextend of PCR $pcr failed (is the TPM at $tcti running?)"
  printf '%s\t%s\t%s\t%s\n' "$pcr" "$h1" "$h256" "$desc"
}

# separator PCR: the UEFI EV_SEPARATOR digest, a hash of 4 zero bytes.
separator() {
  local pcr=$1 h1 h256
  h1=$(printf '\0\0\0\0' | sha1sum | cut -d' ' -f1)
  h256=$(printf '\0\0\0\0' | sha256sum | cut -d' ' -f1)
  tpm2_pcrextend -T "$tcti" "$pcr:sha1=$h1,sha256=$h256" \
    || die "tpm2_pcrextend of PCR $pcr failed (is the TPM at $tcti running?)"
  printf '%s\t%s\t%s\t%s\n' "$pcr" "$h1" "$h256" "separator"
}

# Pre-OS, roughly in UEFI order (PC Client PFP PCR usage).
extend 0 "attestd-sim firmware 1.0"
extend 1 "attestd-sim platform config 1.0"
extend 2 "attestd-sim option ROMs 1.0"
extend 3 "attestd-sim option ROM config 1.0"
extend 5 "attestd-sim GPT and boot variables 1.0"
extend 6 "attestd-sim platform events 1.0"
extend 7 "attestd-sim secure boot policy: SecureBoot=1 PK KEK db dbx"
extend 4 "attestd-sim boot loader shim 15.7"
extend 4 "attestd-sim boot loader grub 2.06"
extend 4 "attestd-sim kernel vmlinuz-6.1.0-sim"
for pcr in 0 1 2 3 4 5 6 7; do separator "$pcr"; done
# What grub measures: its commands, then the kernel and initrd it loads.
extend 8 "attestd-sim grub commands: linux /vmlinuz-6.1.0-sim root=/dev/sda1 ro"
extend 9 "attestd-sim kernel vmlinuz-6.1.0-sim"
extend 9 "attestd-sim initrd initrd.img-6.1.0-sim"

if [ "$tamper" = 1 ]; then
  extend 4 "attestd-sim kernel vmlinuz-6.1.0-evil"
fi
