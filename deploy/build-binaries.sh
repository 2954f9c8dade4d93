#!/usr/bin/env bash
# Builds the two binaries the container images contain, the way their Dockerfiles do (they run this
# script), and checks them: the proxy linked statically (glibc included: it runs on a `static` base
# image, and resolves names with hickory, not glibc's NSS), the control plane against glibc (it resolves
# DNS providers' API hosts with getaddrinfo, so it ships on a base image with glibc). Line tables are
# stripped (8.5 MB instead of 31 MB for the proxy); symbols stay, so backtraces still name functions.
#
#   deploy/build-binaries.sh [OUT [proxy|control-plane|all]]     # defaults: target/images all
#
# Honours CARGO_TARGET_DIR (the image test builds in a directory of its own, so that its quicker build
# never replaces the binary the benchmarks measure).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/images}
which=${2:-all}
case "$which" in
    proxy | control-plane | all) ;;
    *) echo "build-binaries: unknown binary $which (proxy, control-plane or all)" >&2; exit 2 ;;
esac
mkdir -p "$out"
target=${CARGO_TARGET_DIR:-target}
if [ "$which" != control-plane ]; then
    cargo build-static --locked
    objcopy --strip-debug "$target/x86_64-unknown-linux-gnu/release/proxy" "$out/proxy"
    # No program interpreter: static. A dynamic binary would not start on the static base image.
    if readelf --program-headers "$out/proxy" | grep -q INTERP; then
        echo "build-binaries: $out/proxy is dynamically linked; the image's static base cannot run it" >&2
        exit 1
    fi
    "$out/proxy" --version
fi
if [ "$which" != proxy ]; then
    cargo build --release --locked -p keel-control-plane --bin control-plane
    objcopy --strip-debug "$target/release/control-plane" "$out/control-plane"
    "$out/control-plane" --version
fi
ls -l "$out"
