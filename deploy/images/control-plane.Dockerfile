# syntax=docker/dockerfile:1
# The control plane on distroless/cc (glibc: it resolves DNS providers' API hosts with getaddrinfo), as
# user 65532, with its SQLite database on a volume at /var/lib/keel. Build from the repository's root:
#
#   docker build -f deploy/images/control-plane.Dockerfile -t keel/control-plane:0.1.0 .
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    deploy/build-binaries.sh /out control-plane

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/control-plane /usr/local/bin/control-plane
USER 65532:65532
VOLUME /var/lib/keel
# The REST API, the proxies' snapshot stream, the pages and /metrics.
EXPOSE 7080
ENTRYPOINT ["/usr/local/bin/control-plane"]
CMD ["--listen", "0.0.0.0:7080", "--database", "/var/lib/keel/keel.db"]
