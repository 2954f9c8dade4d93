#!/usr/bin/env bash
# A connectivity mesh: every proxy labelled app=keel pings 10 peers (chosen per node by rendezvous
# hashing among the live ones) and checks their SSH port; the matrix is at $CP/matrix.
# Usage: examples/control-plane/netcheck.sh [http://127.0.0.1:7080]   (KEEL_CP_OPERATOR_TOKEN for a token)
# Proxies say where they run through NODE_IP (and POD_IP, POD_NAME, NAMESPACE) from the downward API.
set -euo pipefail
CP=${1:-http://127.0.0.1:7080}
AUTH=()
if [ -n "${KEEL_CP_OPERATOR_TOKEN:-}" ]; then AUTH=(-H "Authorization: Bearer $KEEL_CP_OPERATOR_TOKEN"); fi
api() { curl -sS -X "$1" "${AUTH[@]}" -H "Content-Type: application/json" "$CP/apis/edge.example.com/v1/$2" --data-binary @-; echo; }

api POST probes <<'JSON'
{"apiVersion": "edge.example.com/v1", "kind": "Probe", "metadata": {"name": "mesh"},
 "spec": {"node_selector": {"app": "keel"}, "icmp": {}, "peers": {"address": "node_ip", "count": 10},
          "interval": "5s", "timeout": "1s", "failure_threshold": 3}}
JSON
api POST probes <<'JSON'
{"apiVersion": "edge.example.com/v1", "kind": "Probe", "metadata": {"name": "ssh"},
 "spec": {"node_selector": {"app": "keel"}, "tcp": {}, "peers": {"address": "node_ip", "port": 22, "count": 10},
          "interval": "15s"}}
JSON
curl -sS "${AUTH[@]}" "$CP/api/v1/clients/count"; echo
