#!/usr/bin/env bash
# The boot story, told with a simulated TPM and attestd on its embedded SQLite store:
# enroll -> golden capture -> attest (AFFIRMING, credential) -> tampered boot -> CONTRAINDICATED.
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

step "3. The machine boots (firmware, shim, grub, kernel measured into PCRs 0-9)"
"$here/boot.sh" --tcti "$tcti" | awk -F'\t' '{printf "  PCR %-2s %s\n", $1, $4}'

step "4. The device enrolls: EK certificate chain checked, AK proven to live in the same TPM"
"${agent[@]}" enroll
device_id=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["device_id"])' "$demo/agent/device.json")

step "5. The policy author captures the golden values from this known-good boot"
"${agent[@]}" capture --name default --pcrs sha256:0-9 --output "$demo/golden.yaml"
attestd policy put "$demo/golden.yaml" --server "$server"

step "6. The device attests its boot: nonce -> TPM quote -> verdict"
"${agent[@]}" attest --json >"$demo/attest-good.json" || true
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

step "7. Someone swaps the kernel: the next boot measures one extra event into PCR 4"
"$here/powercycle.sh" --state "$demo/tpm"
"$here/boot.sh" --tcti "$tcti" --tamper | tail -n 1 | awk -F'\t' '{printf "  PCR %-2s %s  <- the extra one\n", $1, $4}'

step "8. The device attests again"
set +e
"${agent[@]}" attest --credential-out "$demo/credential-after-tamper.jwt" | tee "$demo/attest-bad.txt"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 1 ] || ! grep -q "CONTRAINDICATED" "$demo/attest-bad.txt" \
   || ! grep -q "pcr\[sha256:4\]" "$demo/attest-bad.txt" || [ -e "$demo/credential-after-tamper.jwt" ]; then
  echo "demo: expected CONTRAINDICATED naming PCR 4 and no credential" >&2
  exit 1
fi

step "9. What attestd remembers about the device"
attestd device show "$device_id" --server "$server"

printf '\n\033[1mDemo complete:\033[0m the good boot was AFFIRMING with a credential; the tampered boot was CONTRAINDICATED on PCR 4 with none.\n'
