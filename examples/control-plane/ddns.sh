#!/usr/bin/env bash
# Keeps gw.example.com AAAA pointing at the address node gateway-1 reports, through BIND (RFC 2136).
# Usage: examples/control-plane/ddns.sh [http://127.0.0.1:7080]   (KEEL_CP_OPERATOR_TOKEN for a token)
# The control plane reads the TSIG secret (base64, as `tsig-keygen keel` prints it) from the file named.
set -euo pipefail
CP=${1:-http://127.0.0.1:7080}
AUTH=()
if [ -n "${KEEL_CP_OPERATOR_TOKEN:-}" ]; then AUTH=(-H "Authorization: Bearer $KEEL_CP_OPERATOR_TOKEN"); fi
api() { curl -sS -X "$1" "${AUTH[@]}" -H "Content-Type: application/json" "$CP/apis/edge.example.com/v1/$2" --data-binary @-; echo; }

api POST dnsproviders <<'JSON'
{"apiVersion": "edge.example.com/v1", "kind": "DnsProvider", "metadata": {"name": "bind"},
 "spec": {"rfc2136": {"server": "127.0.0.1:53", "key_name": "keel", "secret_file": "/etc/keel/tsig.secret"}}}
JSON
api POST dnsrecords <<'JSON'
{"apiVersion": "edge.example.com/v1", "kind": "DnsRecord", "metadata": {"name": "gw"},
 "spec": {"zone": "example.com", "name": "gw", "type": "AAAA", "ttl": "60s",
          "address_from": {"node": "gateway-1"}, "provider": "bind"}}
JSON
# What a reporter on gateway-1 sends (seed 000's request):
curl -sS -X POST "$CP/api/v1/public-ip" -H "X-API-Token: ${KEEL_CP_PROXY_TOKEN:-}" -H "X-Keel-Node: gateway-1" \
    -H "Content-Type: application/json" -d '{"ipAddress": "2001:db8::1"}'; echo
sleep 1
curl -sS "${AUTH[@]}" "$CP/raw"; echo
