#!/usr/bin/env bash
# The boot story, told with a simulated TPM and attestd on its embedded SQLite store:
# enroll -> golden capture -> attest with the boot event log (AFFIRMING, credential)
# -> tampered boots -> CONTRAINDICATED, naming what changed.
# attestd runs as deployed: TLS (a throwaway trial CA), and every caller with a role
# (admin, policy author, gateway) carries its own API token; devices need none.
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
echo "  TLS on every port (a throwaway CA from 'attestd admin tls-init'); calls that change"
echo "  or read policy, verdicts and devices need an API token with the right role:"
echo "  policy-author, gateway, admin. Devices need none: their TPM proves them."
tls=$demo/tls
attestd admin tls-init --out "$tls" --host 127.0.0.1 --host localhost >/dev/null
# Every client trusts that CA; each step below picks the token of its role.
export ATTESTD_CA_CERT=$tls/ca-cert.pem
unset ATTESTD_TOKEN ATTESTD_TOKEN_FILE ATTESTD_INSECURE
mkdir -m 700 "$demo/attestd" "$demo/tokens"
for role in admin policy-author gateway; do
  # Local mode, on the server's own data directory (how the first tokens are made).
  attestd admin token create --role "$role" --name "demo-$role" --data-dir "$demo/attestd" \
    --out "$demo/tokens/$role.token" >/dev/null
done
echo "  tokens (mode 0600): $demo/tokens/{admin,policy-author,gateway}.token"
as() { local role=$1; shift; ATTESTD_TOKEN_FILE="$demo/tokens/$role.token" "$@"; }
port=$(free_port) # and port+1, free too: the mTLS port (role client certificates)
attestd serve --listen "127.0.0.1:$port" --mtls-listen "127.0.0.1:$((port + 1))" \
  --tls-cert "$tls/server-cert.pem" --tls-key "$tls/server-key.pem" \
  --data-dir "$demo/attestd" \
  --ek-root "$demo/vendor-ca/swtpm-localca-rootca-cert.pem" \
  --ek-intermediate "$demo/vendor-ca/issuercert.pem" >"$demo/attestd.log" 2>&1 &
server_pid=$!
server=127.0.0.1:$port
up=""
for _ in $(seq 100); do
  as policy-author attestd policy list --server "$server" >/dev/null 2>&1 && up=1 && break
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.2
done
[ -n "$up" ] || { echo "demo: attestd did not start:" >&2; cat "$demo/attestd.log" >&2; exit 1; }
echo "attestd listening on $server (TLS), mTLS port $((port + 1))"
agent=(attestd-agent --server "$server" --ca-cert "$ATTESTD_CA_CERT" --tcti "$tcti"
  --state-dir "$demo/agent")

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
echo "without a token, the change is refused:"
set +e
attestd policy put "$demo/golden.yaml" -m "no credential" --server "$server" 2>"$demo/refused.txt"
rc=$?
set -e
[ "$rc" -eq 3 ] && grep -q CREDENTIAL_REQUIRED "$demo/refused.txt" \
  || { echo "demo: expected the unauthenticated change to be refused" >&2; cat "$demo/refused.txt" >&2; exit 1; }
echo "  refused (UNAUTHENTICATED, exit $rc): $(head -n 1 "$demo/refused.txt")"
echo "with the policy author's token:"
as policy-author attestd policy put "$demo/golden.yaml" \
  -m "golden values of the lab reference machine" --server "$server"

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

step "9. What attestd remembers about the device (as an admin), and what a gateway sees"
as admin attestd device show "$device_id" --server "$server"
echo "the gateway's view (gateway token):"
as gateway attestd verdict get "$device_id" --server "$server" | sed 's/^/  /'

step "10. The audit log: every change and verdict, hash-chained and signed (as an admin)"
as admin attestd audit verify --server "$server"

printf '\n\033[1mDemo complete:\033[0m the good boot was AFFIRMING with a credential; the tampered boots were CONTRAINDICATED (PCR 4 with its unlogged extend; Secure Boot off) with none. Every call went over TLS; the policy change without a token was refused.\n'
