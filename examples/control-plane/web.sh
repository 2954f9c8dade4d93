#!/usr/bin/env bash
# Creates a cluster and a listener for every node labelled app=web, through the REST API.
# Usage: examples/control-plane/web.sh [http://127.0.0.1:7080] (KEEL_CP_OPERATOR_TOKEN for a token)
set -euo pipefail
CP=${1:-http://127.0.0.1:7080}
AUTH=()
if [ -n "${KEEL_CP_OPERATOR_TOKEN:-}" ]; then AUTH=(-H "Authorization: Bearer $KEEL_CP_OPERATOR_TOKEN"); fi
api() { curl -sS -X "$1" "${AUTH[@]}" -H "Content-Type: ${3:-application/json}" "$CP/apis/edge.example.com/v1/$2" --data-binary @-; echo; }

api POST clusters <<'JSON'
{"apiVersion": "edge.example.com/v1", "kind": "Cluster", "metadata": {"name": "admin"},
 "spec": {"endpoints": ["127.0.0.1:9901"]}}
JSON
api POST listeners <<'JSON'
{"apiVersion": "edge.example.com/v1", "kind": "Listener", "metadata": {"name": "web"},
 "spec": {"address": "127.0.0.1:10000", "cluster": "admin", "node_selector": {"app": "web"}}}
JSON
# A change is a merge patch; every app=web proxy applies it and ACKs within milliseconds.
api PATCH listeners/web application/merge-patch+json <<'JSON'
{"spec": {"idle_timeout": "5m"}}
JSON
curl -sS "${AUTH[@]}" "$CP/debug/proxies"; echo
