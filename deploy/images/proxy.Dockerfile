# syntax=docker/dockerfile:1
# The proxy: one static binary (glibc linked in) on distroless/static, as user 65532. Every role runs it:
# sidecar, router, DDNS agent, network checker, relay. Build from the repository's root:
#
#   docker build -f deploy/images/proxy.Dockerfile -t keel/proxy:0.1.0 .
#
# Privileges, by role (none runs as root):
# - sidecar: its DNS listens on 127.0.0.2:53; the pod sets the safe sysctl
#   net.ipv4.ip_unprivileged_port_start=0 instead of granting NET_BIND_SERVICE.
# - ICMP probes: an unprivileged ping socket, allowed by the safe sysctl
#   net.ipv4.ping_group_range="0 2147483647" on the pod; no NET_RAW.
# - DDNS agent: hostNetwork (to see the node's addresses); reading addresses over netlink needs no
#   capability.
# - router, relay: unprivileged ports, nothing else.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    deploy/build-binaries.sh /out proxy

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/proxy /usr/local/bin/proxy
COPY schemas/keel.schema.json /usr/share/keel/keel.schema.json
USER 65532:65532
# The admin API (readiness, liveness, metrics); roles add their own ports.
EXPOSE 9901
ENTRYPOINT ["/usr/local/bin/proxy"]
CMD ["--config", "/etc/keel/keel.yaml"]
