#!/usr/bin/env bash
# The boot story, told with a simulated TPM and attestd on its embedded SQLite store:
# enroll -> golden capture -> attest with the boot event log (AFFIRMING, credential)
# -> tampered boots -> CONTRAINDICATED, naming what changed.
# Run through `make demo`, which installs everything first. Exits 0 only if the story
# went as it should; stops every process it started.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
demo=${DEMO_DIR:-$repo/demo-data}
export TSS2_LOG=${TSS2_LOG:-all+none}
py=${PYTHON:-python3}

rm -rf "$demo"
mkdir -p "$demo"
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
  "$here/stop.sh" --state "$demo/tpm" >/dev/null 2>&1 || true
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
free_port() {
  "$py" -c 'import socket
for _ in range(100):
    a = socket.socket(); a.bind(("127.0.0.1", 0)); p = a.getsockname()[1]
    b = socket.socket()
    try:
        b.bind(("127.0.0.1", p + 1)); print(p); break
    except OSError:
        pass
    finally:
        a.close(); b.close()'
}

step "1. A TPM vendor manufactures a TPM (swtpm, EK certificate signed by the vendor CA)"
"$here/manufacture.sh" --ca "$demo/vendor-ca" --state "$demo/tpm" >/dev/null
echo "vendor root: $demo/vendor-ca/swtpm-localca-rootca-cert.pem"
tcti=$("$here/start.sh" --state "$demo/tpm" --port "$(free_port)")
echo "TPM running, TCTI $tcti"

step "2. attestd starts (SQLite store in $demo/attestd), trusting that vendor's root"
port=$(free_port)
attestd serve --listen "127.0.0.1:$port" --data-dir "$demo/attestd" \
  --ek-root "$demo/vendor-ca/swtpm-localca-rootca-cert.pem" \
  --ek-intermediate "$demo/vendor-ca/issuercert.pem" >"$demo/attestd.log" 2>&1 &
server_pid=$!
server=127.0.0.1:$port
for _ in $(seq 50); do
  attestd policy list --server "$server" >/dev/null 2>&1 && break
  sleep 0.2
done
echo "attestd listening on $server"
agent=(attestd-agent --server "$server" --tcti "$tcti" --state-dir "$demo/agent")

bootsim() { "$py" "$here/bootsim.py" --tcti "$tcti" --cache-dir "$demo" "$@"; }

step "3. The machine boots: UEFI Secure Boot, shim, grub, Linux; each step measured and logged"
bootsim --log "$demo/boot-good.log" | awk -F'\t' '{printf "  PCR %-2s %-34s %s\n", $1, $2, $3}'
echo "boot state the log shows (attestd eventlog state):"
attestd eventlog state "$demo/boot-good.log" --json | "$py" -c '
import json, sys
s = json.load(sys.stdin)
print("  Secure Boot:", "enabled" if s["secure_boot"] else "disabled")
print("  boot applications:", ", ".join(a["path"] or a["digest"][:12] for a in s["boot_applications"]))
print("  kernel command line:", s["kernel_cmdlines"][0]["text"] if s["kernel_cmdlines"] else "-")
print("  dbx revocations:", len(s["dbx"]["hashes"]) if s["dbx"] else 0)'

step "4. The device enrolls: EK certificate chain checked, AK proven to live in the same TPM"
"${agent[@]}" enroll
device_id=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["device_id"])' "$demo/agent/device.json")

step "5. The policy author captures the golden values from this known-good boot, adds boot rules"
"${agent[@]}" capture --name default --pcrs sha256:0-9 --output "$demo/golden.yaml"
cat >>"$demo/golden.yaml" <<'EOF'
eventlog:
  require_secure_boot: true
  kernel_cmdline:
    regex: ['/vmlinuz-\S+ root=/dev/sda1 ro( quiet)?']
EOF
sed -n '/^eventlog:/,$p' "$demo/golden.yaml" | sed 's/^/  /'
attestd policy put "$demo/golden.yaml" -m "golden values of the lab reference machine" --server "$server"

step "6. The device attests its boot: nonce -> TPM quote -> verdict"
"${agent[@]}" attest --event-log "$demo/boot-good.log" --json >"$demo/attest-good.json" || true
"$py" - "$demo/attest-good.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
status = r["verdict"]["status"].removeprefix("VERDICT_STATUS_")
print(f"verdict: {status}")
if status != "AFFIRMING" or not r.get("credential"):
    sys.exit("expected AFFIRMING with a credential")
print("session credential (EAR JWT, ES256), decoded:")
print(json.dumps(r["credential_claims"], indent=2))
EOF

# attest_expect LOG OUTFILE PATTERN...: attest with LOG; it must be refused with no
# credential, and the output must name every PATTERN.
attest_expect() {
  local log=$1 out=$2; shift 2
  set +e
  "${agent[@]}" attest --event-log "$log" --credential-out "$out.jwt" | tee "$out"
  local rc=${PIPESTATUS[0]}
  set -e
  [ "$rc" -eq 1 ] && grep -q CONTRAINDICATED "$out" && [ ! -e "$out.jwt" ] \
    || { echo "demo: expected CONTRAINDICATED and no credential" >&2; exit 1; }
  for pattern in "$@"; do
    grep -q -- "$pattern" "$out" || { echo "demo: expected the verdict to name $pattern" >&2; exit 1; }
  done
}

step "7. Someone slips one extra, unlogged measurement into PCR 4 (code the log does not admit)"
"$here/powercycle.sh" --state "$demo/tpm"
bootsim --log "$demo/boot-unlogged.log" --tamper unlogged >/dev/null
echo "  the TPM saw one extend more than the event log records"

step "8. The device attests again"
attest_expect "$demo/boot-unlogged.log" "$demo/attest-unlogged.txt" \
  "PCR_VALUE_NOT_ALLOWED pcr\[sha256:4\]" "EVENTLOG_REPLAY_MISMATCH pcr\[sha256:4\]"

step "8b. Another boot: Secure Boot switched off in firmware setup"
"$here/powercycle.sh" --state "$demo/tpm"
bootsim --log "$demo/boot-sb-off.log" --tamper secureboot-off >/dev/null
attest_expect "$demo/boot-sb-off.log" "$demo/attest-sb-off.txt" "SECURE_BOOT_DISABLED"

step "9. What attestd remembers about the device"
attestd device show "$device_id" --server "$server"

printf '\n\033[1mDemo complete:\033[0m the good boot was AFFIRMING with a credential; the tampered boots were CONTRAINDICATED (PCR 4 with its unlogged extend; Secure Boot off) with none.\n'
