#!/usr/bin/env bash
# Creates the control-plane resources a Kubernetes deployment needs, through the REST API (idempotent:
# an existing resource is replaced):
# - a Router per router node: listens on 0.0.0.0:7000, reached at the node's InternalIP:7000 (hostPort);
# - with --example, the example's DNS zone and its published and visited `web` service.
#
#   deploy/kubernetes/configure.sh [--example] [--routers "NODE=IP ..."] [--cluster-dns IP]
#
# Without --routers, the nodes labelled keel.dev/router=true are read with kubectl; without
# --cluster-dns, kube-dns's ClusterIP. The control plane is KEEL_CP_URL with KEEL_CP_OPERATOR_TOKEN when
# both are set; otherwise this script port-forwards to it and reads the token from its Secret.
set -euo pipefail
example=false
routers=""
cluster_dns=""
while [ $# -gt 0 ]; do
    case "$1" in
        --example) example=true ;;
        --routers) routers=$2; shift ;;
        --cluster-dns) cluster_dns=$2; shift ;;
        *) echo "configure.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

if [ -z "${KEEL_CP_URL:-}" ] || [ -z "${KEEL_CP_OPERATOR_TOKEN:-}" ]; then
    KEEL_CP_OPERATOR_TOKEN=$(kubectl -n keel-system get secret keel-control-plane-tokens \
        -o jsonpath='{.data.operator}' | base64 -d | head -n 1)
    kubectl -n keel-system port-forward service/keel-control-plane 17080:7080 >/dev/null &
    forward=$!
    trap 'kill $forward' EXIT
    KEEL_CP_URL=http://127.0.0.1:17080
    for _ in $(seq 50); do curl -fs "$KEEL_CP_URL/healthz" >/dev/null 2>&1 && break; sleep 0.2; done
fi
if [ -z "$routers" ]; then
    routers=$(kubectl get nodes -l keel.dev/router=true -o jsonpath='{range .items[*]}{.metadata.name}={.status.addresses[?(@.type=="InternalIP")].address}{" "}{end}')
fi
if [ -z "$routers" ]; then
    echo "configure.sh: no router nodes: label some with keel.dev/router=true, or give --routers" >&2
    exit 1
fi

# PUT replaces an existing resource; a 404 means it is new: POST it.
apply() {
    local collection=$1 name=$2 body=$3 answer status
    local url=$KEEL_CP_URL/apis/edge.example.com/v1/$collection
    local headers=(-H "Authorization: Bearer $KEEL_CP_OPERATOR_TOKEN" -H 'Content-Type: application/json')
    answer=$(mktemp)
    status=$(curl -sS -o "$answer" -w '%{http_code}' -X PUT "${headers[@]}" --data-binary "$body" "$url/$name")
    if [ "$status" = 404 ]; then
        status=$(curl -sS -o "$answer" -w '%{http_code}' -X POST "${headers[@]}" --data-binary "$body" "$url")
    fi
    if [ "$status" != 200 ] && [ "$status" != 201 ]; then
        echo "configure.sh: $collection/$name: HTTP $status: $(cat "$answer")" >&2
        rm -f "$answer"
        exit 1
    fi
    rm -f "$answer"
    echo "$collection/$name: applied"
}

for router in $routers; do
    node=${router%%=*}
    ip=${router#*=}
    apply routers "$node" "{\"apiVersion\":\"edge.example.com/v1\",\"kind\":\"Router\",\"metadata\":{\"name\":\"$node\"},
      \"spec\":{\"listen\":\"0.0.0.0:7000\",\"address\":\"$ip:7000\",\"token_file\":\"/etc/keel/router-token/token\"}}"
done

if $example; then
    if [ -z "$cluster_dns" ]; then
        cluster_dns=$(kubectl -n kube-system get service kube-dns -o jsonpath='{.spec.clusterIP}')
    fi
    apply dnszones example-client "{\"apiVersion\":\"edge.example.com/v1\",\"kind\":\"DnsZone\",\"metadata\":{\"name\":\"example-client\"},
      \"spec\":{\"listen\":[\"127.0.0.2:53\"],\"namespace\":\"keel-example\",\"upstreams\":[\"$cluster_dns:53\"],
      \"node_selector\":{\"app\":\"example-client\"}}}"
    apply namespaces/keel-example/publishedservices web '{"apiVersion":"edge.example.com/v1","kind":"PublishedService",
      "metadata":{"name":"web","namespace":"keel-example"},
      "spec":{"local":"127.0.0.1:8080","secret_file":"/etc/keel/tunnels/web/secret","node_selector":{"app":"example-web"}}}'
    apply namespaces/keel-example/visitedservices web '{"apiVersion":"edge.example.com/v1","kind":"VisitedService",
      "metadata":{"name":"web","namespace":"keel-example"},
      "spec":{"secret_file":"/etc/keel/tunnels/web/secret","port":8080,"node_selector":{"app":"example-client"}}}'
fi
